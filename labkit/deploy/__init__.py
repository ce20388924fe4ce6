"""Deployments for a class: the pieces a JupyterHub needs to give every
learner their own limited, killable group of processes (``cgroups``) and the
spawner that uses them (``spawner``, imported by ``deploy/hub/jupyterhub_config.py``).
JupyterHub itself is not a labkit dependency: only ``spawner`` imports it."""
