"""Code that runs inside the guest (standard library only; it imports nothing
of labkit outside this folder): the pin probes (``pinprobe/``, shipped as one
zipapp by ``bundle``), the counterfactual helper, and the vocabulary the guest
and the host share (``vocab``)."""
