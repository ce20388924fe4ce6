"""Offline checks of the Zero to JupyterHub deployment in deploy/k8s/ (no cluster is reachable here).

What is validated:
1. values.yaml, alone and with values-kvm.yaml deep-merged on top (as `helm -f a -f b` merges),
   against VALUES_SCHEMA below: the chart keys this project sets, with their types and no unknown
   keys in the parts we set (a misspelt key fails). The schema is written in this project from
   the chart's documented configuration reference, not copied from the chart's own
   values.schema.json (no package on a reachable registry ships that file).
2. The chart's mapping of `singleuser.*` onto KubeSpawner's configuration, done here for the keys
   we use, loaded by a real KubeSpawner from the PyPI package (its trait validators: memory as a
   byte specification, CPU as a float, ...): a value the hub would refuse at start fails here.
3. The pod that KubeSpawner generates for a learner (`get_pod_manifest`, which calls its own
   `make_pod`) against the Kubernetes API schema (kubernetes-validate, strict: unknown fields fail).
What is not run: helm, a hub pod, a learner pod, the image build (see docs/slurm-and-kubernetes.md).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio.config import kube_config
from kubespawner import KubeSpawner
from traitlets import TraitError
from traitlets.config import Config

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KVM_RESOURCE = "devices.kubevirt.io/kvm"


def _obj(props: dict[str, Any], closed: bool = True) -> dict[str, Any]:
    return {"type": "object", "properties": props, "additionalProperties": not closed}


QUANTITY = {"type": ["string", "number"], "pattern": r"^[0-9.]+([KMGTPE]i?)?$"}
NULLABLE_STR = {"type": ["string", "null"]}
VALUES_SCHEMA = _obj({
    "singleuser": _obj({
        "image": _obj({"name": {"type": "string"}, "tag": {"type": "string"},
                       "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never", None]}}),
        "cmd": {"type": ["string", "array", "null"]},
        "defaultUrl": NULLABLE_STR,
        "uid": {"type": ["integer", "null"]},
        "fsGid": {"type": ["integer", "null"]},
        "startTimeout": {"type": "integer"},
        "memory": _obj({"guarantee": QUANTITY, "limit": QUANTITY}),
        "cpu": _obj({"guarantee": {"type": "number"}, "limit": {"type": "number"}}),
        "extraResource": _obj({"limits": {"type": "object", "additionalProperties": {"type": "string"}},
                               "guarantees": {"type": "object", "additionalProperties": {"type": "string"}}}),
        "extraEnv": {"type": "object", "additionalProperties": {"type": "string"}},
        "storage": _obj({
            "type": {"enum": ["dynamic", "static", "none"]},
            "capacity": {"type": "string"},
            "homeMountPath": {"type": "string"},
            "dynamic": _obj({"storageClass": NULLABLE_STR, "pvcNameTemplate": {"type": "string"},
                             "volumeNameTemplate": {"type": "string"},
                             "storageAccessModes": {"type": "array", "items": {"type": "string"}}}),
            "extraVolumes": {"type": ["array", "object"]},
            "extraVolumeMounts": {"type": ["array", "object"]},
        }),
    }),
    "cull": _obj({"enabled": {"type": "boolean"}, "users": {"type": "boolean"},
                  "removeNamedServers": {"type": "boolean"}, "timeout": {"type": "integer", "minimum": 1},
                  "every": {"type": "integer", "minimum": 1}, "concurrency": {"type": "integer", "minimum": 1},
                  "maxAge": {"type": "integer", "minimum": 0}}),
    "hub": _obj({"config": {"type": "object"}}),
    "prePuller": _obj({"hook": _obj({"enabled": {"type": "boolean"}}),
                       "continuous": _obj({"enabled": {"type": "boolean"}})}),
    "scheduling": _obj({"userScheduler": _obj({"enabled": {"type": "boolean"}}),
                        "podPriority": _obj({"enabled": {"type": "boolean"}}),
                        "userPlaceholder": _obj({"enabled": {"type": "boolean"},
                                                 "replicas": {"type": "integer", "minimum": 0}})}),
})


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's merge of values files: maps merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load(*names: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for n in names:
        merged = deep_merge(merged, yaml.safe_load((K8S / n).read_text()))
    return merged


def spawner_config(values: dict[str, Any]) -> Config:
    """KubeSpawner's configuration from the values, as the chart's hub config maps singleuser.*
    (for the keys this project sets)."""
    su = values["singleuser"]
    storage = su["storage"]
    c = Config()
    k = c.KubeSpawner
    k.image = f"{su['image']['name']}:{su['image']['tag']}"
    k.image_pull_policy = su["image"]["pullPolicy"]
    k.cmd = su["cmd"]
    k.default_url = su["defaultUrl"]
    k.uid, k.fs_gid = su["uid"], su["fsGid"]
    k.start_timeout = su["startTimeout"]
    k.mem_limit, k.mem_guarantee = su["memory"]["limit"], su["memory"]["guarantee"]
    k.cpu_limit, k.cpu_guarantee = su["cpu"]["limit"], su["cpu"]["guarantee"]
    k.extra_resource_limits = su.get("extraResource", {}).get("limits", {})
    k.extra_resource_guarantees = su.get("extraResource", {}).get("guarantees", {})
    k.environment = su["extraEnv"]
    dyn = storage["dynamic"]
    k.pvc_name_template = dyn["pvcNameTemplate"]
    k.storage_capacity = storage["capacity"]
    k.storage_access_modes = dyn["storageAccessModes"]
    k.volumes = [{"name": dyn["volumeNameTemplate"], "persistentVolumeClaim": {"claimName": dyn["pvcNameTemplate"]}},
                 *storage["extraVolumes"]]
    k.volume_mounts = [{"name": dyn["volumeNameTemplate"], "mountPath": storage["homeMountPath"]},
                       *storage["extraVolumeMounts"]]
    for trait, value in values.get("hub", {}).get("config", {}).get("KubeSpawner", {}).items():
        setattr(k, trait, value)          # hub.config.KubeSpawner reaches the spawner as it is
    return c


@pytest.fixture(autouse=True)
def offline_kubeconfig(tmp_path, monkeypatch):
    """KubeSpawner loads a kube config when it is created; this one names an address nothing
    listens on and is never contacted (only the pod manifest is generated)."""
    cfg = tmp_path / "kubeconfig"
    cfg.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "unused"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline", "namespace": "labkit"}}],
        "current-context": "offline"}))
    # kubernetes_asyncio reads $KUBECONFIG when it is imported, hence the module attribute.
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(cfg))


def pod_manifest(values: dict[str, Any]) -> dict[str, Any]:
    """The learner pod KubeSpawner would create (its get_pod_manifest calls make_pod), as JSON."""
    async def make() -> dict[str, Any]:
        spawner = KubeSpawner(config=spawner_config(values), _mock=True)
        pod = await spawner.get_pod_manifest()
        out = spawner.api.api_client.sanitize_for_serialization(pod)
        await spawner.api.api_client.close()
        return out
    return asyncio.run(make())


VARIANTS = [("values.yaml",), ("values.yaml", "values-kvm.yaml")]


@pytest.mark.parametrize("files", VARIANTS, ids=["tcg", "kvm"])
def test_values_match_the_chart_keys(files):
    jsonschema.validate(load(*files), VALUES_SCHEMA)


def test_a_misspelt_key_is_caught():
    bad = deep_merge(load("values.yaml"), {"singleuser": {"memory": {"limt": "3G"}}})
    with pytest.raises(jsonschema.ValidationError, match="limt"):
        jsonschema.validate(bad, VALUES_SCHEMA)
    with pytest.raises(TraitError):
        pod_manifest(deep_merge(load("values.yaml"), {"singleuser": {"memory": {"limit": "three gigs"}}}))


def test_deep_merge_keeps_the_base_and_overrides_leaves():
    v = load("values.yaml", "values-kvm.yaml")
    assert v["singleuser"]["memory"]["limit"] == "3G"                      # kept from the base
    assert v["singleuser"]["cpu"]["guarantee"] == 0.25                    # overridden
    assert "LABKIT_ACCEL" not in v["singleuser"]["extraEnv"]              # labkit probes, and falls back to TCG
    assert v["singleuser"]["extraEnv"]["LABKIT_IMAGES_DIR"] == "/opt/labkit/images"
    assert v["hub"]["config"]["KubeSpawner"]["supplemental_gids"]          # added
    assert v["hub"]["config"]["JupyterHub"]["authenticator_class"] == "dummy"   # kept


@pytest.mark.parametrize("files", VARIANTS, ids=["tcg", "kvm"])
def test_learner_pod_is_a_valid_kubernetes_object(files):
    manifest = pod_manifest(load(*files))
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    container = manifest["spec"]["containers"][0]
    res = container["resources"]
    assert (res["limits"]["memory"], res["requests"]["memory"]) == (3 * 1024**3, 2 * 1024**3)
    assert res["limits"]["cpu"] == 2.0 and res["requests"]["cpu"] == (0.25 if "values-kvm.yaml" in files else 0.5)
    assert (KVM_RESOURCE in res["limits"]) == ("values-kvm.yaml" in files)
    assert container["securityContext"]["runAsUser"] == 1000 and not container["securityContext"].get("privileged")
    # with KVM, the learner is in the nodes' kvm group (the plugin's /dev/kvm is root:kvm 0660)
    groups = manifest["spec"].get("securityContext", {}).get("supplementalGroups", [])
    assert bool(groups) == ("values-kvm.yaml" in files), manifest["spec"].get("securityContext")
    assert manifest["spec"]["securityContext"]["fsGroup"] == 100      # kept beside them
    claims = [v["persistentVolumeClaim"]["claimName"] for v in manifest["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert len(claims) == 1 and claims[0].startswith("claim-")
    assert {"name": "LABKIT_STATE_DIR", "value": "/home/jovyan/.local/state/labkit"} in container["env"]
    # the image's snapshots (deploy/container/customize.sh puts them there) are the shared cache
    assert {"name": "LABKIT_SHARED_CACHE_DIR", "value": "/var/cache/labkit"} in container["env"]
    recipe = (K8S.parent / "container" / "customize.sh").read_text()
    assert '"$root/var/cache/labkit/snapshots"' in recipe


def test_an_invalid_pod_is_refused():
    """The validator is not a rubber stamp: a malformed field in the generated pod fails."""
    manifest = pod_manifest(load("values.yaml"))
    manifest["spec"]["containers"][0]["ports"][0]["containerPort"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_idle_culling_is_on_and_bounded():
    cull = load("values.yaml")["cull"]
    assert cull["enabled"] and 0 < cull["every"] < cull["timeout"] <= cull["maxAge"]


@pytest.mark.parametrize("files", VARIANTS, ids=["tcg", "kvm"])
def test_someone_can_log_in_with_the_shipped_authenticator(files):
    """The hub's authenticator as the values configure it (JupyterHub's own DummyAuthenticator,
    with its traits from hub.config): any name logs in; with the shared password set at install,
    only that password does. (allow_all: false with no allowed users locked everyone out.)"""
    from jupyterhub.auth import DummyAuthenticator

    hub = load(*files)["hub"]["config"]
    assert hub["JupyterHub"]["authenticator_class"] == "dummy"

    def login(password_set: str, name: str, password: str) -> Any:
        c = Config({k: v for k, v in hub.items() if k in ("Authenticator", "DummyAuthenticator")})
        if password_set:
            c.DummyAuthenticator.password = password_set
        auth = DummyAuthenticator(config=c)
        async def go() -> Any:
            user = await auth.get_authenticated_user(None, {"username": name, "password": password})
            return user and user["name"]
        return asyncio.run(go())

    assert login("", "ada", "anything") == "ada"
    assert login("s3cret-tutorial", "ada", "s3cret-tutorial") == "ada"
    assert login("s3cret-tutorial", "bob", "wrong") is None
