"""Host-side tools: ``doctor`` (can this host run the lab?) and ``bench``
(speed and memory figures)."""
