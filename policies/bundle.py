"""Policy bundles: a folder with ``bundle.json`` and ``weights.safetensors``.

``bundle.json`` names the algorithm, the feature and action names the
network was trained on, its architecture, how it picks actions, the
resolved training config, the data and code versions, evaluation results
and the sha256 of the weights. :func:`load` rebuilds the network from it
with :mod:`policies.networks` and reads the weights with safetensors: no
pickle is ever loaded, and weights whose hash does not match refuse to load.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from carepath.jsontypes import is_int, is_number
from envs.spec import ACTION_NAMES, FEATURE_NAMES, SPEC_CHANGES, SPEC_VERSION
from policies.base import BoolArray, FloatArray, check_inputs, mix_epsilon
from policies.baselines import BASELINES, make_baseline
from policies.behaviour_model import BehaviourModel
from policies.candidates import Candidate, candidate_from_record
from policies.networks import NetworkSpec, PolicyNetwork

BUNDLE_FORMAT = "carepath-policy-bundle"
BUNDLE_VERSION = 1
MANIFEST = "bundle.json"
WEIGHTS = "weights.safetensors"
#: Names of further tensor files a bundle may carry (never the weights file's name).
EXTRA_FILE = re.compile(r"(?!weights\.)[a-z][a-z0-9_]*\.safetensors")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: A manifest is a few kB (a prepared one with evaluation results well under 100 kB): more is refused unread.
MAX_MANIFEST_BYTES = 8 << 20
#: The estimated behaviour policy a certified candidate mixes with (``carepath certify``).
BEHAVIOUR_FILE = "behaviour.safetensors"
#: Keyed hashes of the patients that trained the policy: certification refuses them.
TRAINING_PATIENTS_FILE = "training_patients.safetensors"


class BundleError(ValueError):
    """A bundle that cannot be trusted or read; the message names the file and the field."""


@dataclass(frozen=True)
class ActionSelection:
    """How a network's outputs become action probabilities (over allowed actions only).

    ``greedy``: all mass on the best allowed action. ``softmax``: a softmax of
    outputs / ``temperature``. Either mixed with ``epsilon`` uniform.
    """

    kind: Literal["greedy", "softmax"] = "greedy"
    temperature: float = 1.0
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("greedy", "softmax"):
            raise ValueError(f"action selection must be 'greedy' or 'softmax', got {self.kind!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")


@dataclass
class BundleManifest:
    """The content of ``bundle.json``."""

    algorithm: str
    name: str
    network: NetworkSpec
    selection: ActionSelection = field(default_factory=ActionSelection)
    feature_names: list[str] = field(default_factory=lambda: list(FEATURE_NAMES))
    action_names: list[str] = field(default_factory=lambda: list(ACTION_NAMES))
    spec_version: int = SPEC_VERSION
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    evaluation: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)  # e.g. a SHAP background, added by serving
    created: str = ""
    weights_sha256: str = ""
    #: further safetensors files in the folder (e.g. serving's benefit model): name -> sha256
    files: dict[str, str] = field(default_factory=dict)
    #: what the logged data vouches for (``carepath certify``); empty: never certified
    certificate: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "algorithm": self.algorithm,
            "name": self.name,
            "network": self.network.to_dict(),
            "selection": {"kind": self.selection.kind, "temperature": self.selection.temperature,
                          "epsilon": self.selection.epsilon},
            "feature_names": self.feature_names,
            "action_names": self.action_names,
            "spec_version": self.spec_version,
            "config": self.config,
            "data": self.data,
            "code_version": self.code_version,
            "evaluation": self.evaluation,
            "explain": self.explain,
            "created": self.created,
            "weights_sha256": self.weights_sha256,
            "files": self.files,
            "certificate": self.certificate,
        }

    @classmethod
    def from_json(cls, d: Any, where: Path) -> BundleManifest:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{where}: field 'format' must be {BUNDLE_FORMAT!r}, got {_short(d.get('format'))}")
        if not is_int(d.get("format_version")) or d["format_version"] != BUNDLE_VERSION:
            raise BundleError(f"{where}: unsupported format_version {_short(d.get('format_version'))} "
                              f"(this carepath reads {BUNDLE_VERSION})")
        for key, kind in (("algorithm", str), ("name", str), ("network", dict), ("feature_names", list),
                          ("action_names", list), ("weights_sha256", str)):
            if not isinstance(d.get(key), kind):
                raise BundleError(f"{where}: field {key!r} must be a {kind.__name__}, got {_short(d.get(key))}")
        for key, kind in (("selection", dict), ("config", dict), ("data", dict), ("evaluation", dict),
                          ("explain", dict), ("files", dict), ("code_version", str), ("created", str),
                          ("certificate", dict)):
            if key in d and not isinstance(d[key], kind):
                raise BundleError(f"{where}: field {key!r} must be a {kind.__name__}, got {_short(d[key])}")
        if "spec_version" in d and not is_int(d["spec_version"]):
            raise BundleError(f"{where}: field 'spec_version' must be an integer, got {_short(d['spec_version'])}")
        if not SHA256_HEX.fullmatch(d["weights_sha256"]):
            raise BundleError(f"{where}: field 'weights_sha256' must be a sha256 hex digest, "
                              f"got {_short(d['weights_sha256'])}")
        files = d.get("files", {})
        if not all(isinstance(k, str) and EXTRA_FILE.fullmatch(k) and isinstance(v, str) and SHA256_HEX.fullmatch(v)
                   for k, v in files.items()):
            raise BundleError(f"{where}: field 'files' must map names like 'benefit.safetensors' to sha256 hex digests")
        _check_network_fields(d["network"], where)
        _check_selection_fields(d.get("selection", {}), where)
        _check_certificate_fields(d.get("certificate", {}), where)
        try:
            network = NetworkSpec.from_dict(d["network"])
        except (TypeError, ValueError) as err:
            raise BundleError(f"{where}: field 'network': {_one_line(err)}") from None
        try:
            selection = ActionSelection(**d.get("selection", {}))
        except (TypeError, ValueError) as err:
            raise BundleError(f"{where}: field 'selection': {_one_line(err)}") from None
        return cls(
            algorithm=d["algorithm"], name=d["name"], network=network, selection=selection,
            feature_names=list(d["feature_names"]), action_names=list(d["action_names"]),
            spec_version=d.get("spec_version", 0), config=dict(d.get("config", {})),
            data=dict(d.get("data", {})), code_version=str(d.get("code_version", "")),
            evaluation=dict(d.get("evaluation", {})), explain=dict(d.get("explain", {})),
            created=str(d.get("created", "")), weights_sha256=d["weights_sha256"], files=dict(files),
            certificate=dict(d.get("certificate", {})),
        )




def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(err: BaseException) -> str:
    """An error's message on one line (torch's load_state_dict errors span several)."""
    return " ".join(str(err).split())


def _check_network_fields(net: dict[str, Any], where: Path) -> None:
    """Types of ``network``: JSON offers floats, bools and strings where sizes belong; refuse
    them here rather than let them be coerced (16.7 -> 16) or fail later inside torch."""
    for key in ("n_in", "n_out", "ensemble"):
        if key in net and not is_int(net[key]):
            raise BundleError(f"{where}: field 'network.{key}' must be an integer, got {_short(net[key])}")
    hidden = net.get("hidden", [])
    if not isinstance(hidden, list) or not all(is_int(h) for h in hidden):
        raise BundleError(f"{where}: field 'network.hidden' must be a list of integers, got {_short(hidden)}")
    for key in ("activation", "output"):
        if key in net and not isinstance(net[key], str):
            raise BundleError(f"{where}: field 'network.{key}' must be a string, got {_short(net[key])}")
    extra = net.get("extra", {})
    if not isinstance(extra, dict):
        raise BundleError(f"{where}: field 'network.extra' must be an object, got {_short(extra)}")
    unknown = sorted(set(extra) - {"clip_obs", "threshold"})
    if unknown:
        raise BundleError(f"{where}: field 'network.extra' has unknown key(s) {_short(unknown)}")
    if "clip_obs" in extra and not (is_number(extra["clip_obs"]) and extra["clip_obs"] > 0):
        raise BundleError(f"{where}: field 'network.extra.clip_obs' must be a positive number, "
                          f"got {_short(extra['clip_obs'])}")
    if "threshold" in extra and not is_number(extra["threshold"]):
        raise BundleError(f"{where}: field 'network.extra.threshold' must be a number, "
                          f"got {_short(extra['threshold'])}")


def _check_certificate_fields(cert: dict[str, Any], where: Path) -> None:
    """A certificate decides what is served: every field serving reads has its type, or the bundle is refused."""
    if not cert:
        return
    for key, ok, expected in (
        ("certified", lambda v: isinstance(v, bool), "true or false"),
        ("id", lambda v: isinstance(v, str) and re.fullmatch(r"cert-[0-9a-f]{16}", v) is not None,
         "an id like 'cert-0123456789abcdef'"),
        ("confidence", lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
        ("lower_bound", is_number, "a number (percentage points)"),
        ("improvement", is_number, "a number (percentage points)"),
        ("candidate", lambda v: isinstance(v, dict), "an object"),
        ("behaviour_model", lambda v: isinstance(v, dict) and v.get("kind") in ("baseline", "fitted", "given"),
         "an object with kind 'baseline', 'fitted' or 'given'"),
    ):
        if not ok(cert.get(key)):
            raise BundleError(f"{where}: field 'certificate.{key}' must be {expected}, got {_short(cert.get(key))}")
    try:
        candidate_from_record(cert["candidate"])
    except ValueError as err:
        raise BundleError(f"{where}: field 'certificate.candidate': {_one_line(err)}") from None


def _check_selection_fields(selection: dict[str, Any], where: Path) -> None:
    if "kind" in selection and not isinstance(selection["kind"], str):
        raise BundleError(f"{where}: field 'selection.kind' must be a string, got {_short(selection['kind'])}")
    for key in ("temperature", "epsilon"):
        if key in selection and not is_number(selection[key]):
            raise BundleError(f"{where}: field 'selection.{key}' must be a finite number, "
                              f"got {_short(selection[key])}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"carepath {version('carepath')}"
    except PackageNotFoundError:
        return "carepath (not installed)"


def save_bundle(
    path: str | Path,
    network: PolicyNetwork,
    manifest: BundleManifest,
    overwrite: bool = False,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a bundle folder atomically: built under a temporary name, then renamed.

    ``extra_tensors`` maps further file names (``EXTRA_FILE``) to tensors to store
    beside the weights; their hashes go to ``manifest.files`` and are checked on load.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    if manifest.network != network.spec:
        raise ValueError("the manifest's network spec does not match the network being saved")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS))
        manifest.weights_sha256 = sha256_file(tmp / WEIGHTS)
        manifest.files = {}
        for name, extra in (extra_tensors or {}).items():
            if not EXTRA_FILE.fullmatch(name):
                raise ValueError(f"extra bundle file name {name!r} must look like 'benefit.safetensors'")
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / name))
            manifest.files[name] = sha256_file(tmp / name)
        manifest.created = manifest.created or datetime.now(UTC).isoformat(timespec="seconds")
        manifest.code_version = manifest.code_version or code_version()
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class BundlePolicy:
    """A policy rebuilt from a bundle: ``action_probs``, ``q_values`` where the network has them."""

    def __init__(self, manifest: BundleManifest, network: PolicyNetwork, path: Path | None = None,
                 behaviour: BehaviourModel | None = None) -> None:

        self.manifest = manifest
        self.network = network.eval()
        self.path = path
        self.name = manifest.name
        self.algorithm = manifest.algorithm
        #: a certified bundle serves the certified candidate: the network mixed with current care
        self.served: Candidate | None = None
        self.behaviour: Any = behaviour
        # only a certified candidate is served; an uncertified bundle serves its network (with a banner)
        candidate = manifest.certificate.get("candidate") if manifest.certificate.get("certified") else None
        spec = manifest.certificate.get("behaviour_model") if manifest.certificate else None
        if candidate is not None and isinstance(spec, dict) and spec.get("kind") == "baseline":
            # current care is a known baseline policy (the log was simulated under it)
            if spec.get("name") not in BASELINES or not is_number(spec.get("epsilon")):
                raise BundleError(f"policy {self.name!r}: field 'certificate.behaviour_model' names no baseline "
                                  f"policy ({_short(spec)})")
            self.behaviour = make_baseline(str(spec["name"]), float(spec["epsilon"]))
        if candidate is not None:
            if self.behaviour is None:
                raise BundleError(f"policy {self.name!r}: its certificate serves a mix with current care, but the "
                                  f"bundle has no {BEHAVIOUR_FILE}")
            self.served = candidate_from_record(candidate)

    @property
    def certificate(self) -> dict[str, Any] | None:
        """The certificate of ``carepath certify`` (None: never certified)."""
        return self.manifest.certificate or None

    @property
    def certified(self) -> bool:
        return bool(self.manifest.certificate.get("certified", False))

    @property
    def has_q_values(self) -> bool:
        return self.manifest.network.output in ("q_values", "q_ensemble", "q_bcq")

    @torch.no_grad()
    def _forward(self, obs: NDArray[np.floating]) -> NDArray[np.float64]:
        """The network's raw output: (n, n_out), or (ensemble, n, n_actions) for ``q_ensemble``."""
        return self.network(torch.as_tensor(np.asarray(obs, dtype=np.float32))).double().numpy()

    def _outputs(self, raw: NDArray[np.float64]) -> NDArray[np.float64]:
        output = self.manifest.network.output
        if output == "q_ensemble":
            return raw.mean(axis=0)
        if output == "q_bcq":
            return raw[:, : len(ACTION_NAMES)]
        return raw

    def outputs(self, obs: NDArray[np.floating]) -> NDArray[np.float64]:
        """Q-values or logits, (n, n_actions): the ensemble mean for ``q_ensemble``,
        the Q half for ``q_bcq``."""
        return self._outputs(self._forward(obs))

    def _scores(self, raw: NDArray[np.float64], mask: BoolArray) -> NDArray[np.float64]:
        """Outputs with every action the policy may not choose set to -inf."""
        scores = np.where(mask, self._outputs(raw), -np.inf)
        if self.manifest.network.output == "q_bcq":
            # discrete BCQ: only actions the imitation model finds plausible enough
            logits = np.where(mask, raw[:, len(ACTION_NAMES):], -np.inf)
            rel = np.exp(logits - logits.max(axis=1, keepdims=True))
            plausible = rel >= float(self.manifest.network.extra["threshold"])
            scores = np.where(plausible, scores, -np.inf)
        return scores

    @torch.no_grad()
    def q_ensemble(self, obs: NDArray[np.floating]) -> NDArray[np.float64]:
        """Each ensemble member's Q-values, (ensemble, n, n_actions)."""
        if self.manifest.network.output != "q_ensemble":
            raise ValueError(f"policy {self.name!r} has no Q ensemble")
        return self.network(torch.as_tensor(np.asarray(obs, dtype=np.float32))).double().numpy()

    def extra_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A further tensor file of the bundle (see ``save_bundle``), its hash checked again."""
        if self.path is None or name not in self.manifest.files:
            where = self.path / MANIFEST if self.path is not None else f"policy {self.name!r}"
            raise BundleError(f"{where}: the bundle has no {name!r} in field 'files'")
        return _read_checked(self.path / name, self.manifest.files[name])

    def q_values(self, obs: NDArray[np.floating]) -> NDArray[np.float64]:
        if not self.has_q_values:
            raise ValueError(f"policy {self.name!r} ({self.algorithm}) outputs logits, not Q-values")
        return self.outputs(np.atleast_2d(obs))

    def action_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        return self.outputs_and_probs(obs, mask)[1]

    def network_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> FloatArray:
        """The trained network's own probabilities, before any certified mix with current care."""
        obs, mask = check_inputs(obs, mask)
        return self._network_probs(self._forward(obs), mask)

    def _network_probs(self, raw: NDArray[np.float64], mask: BoolArray) -> FloatArray:
        scores = self._scores(raw, mask)
        sel = self.manifest.selection
        if sel.kind == "greedy":
            probs = np.zeros_like(scores)
            probs[np.arange(len(scores)), scores.argmax(axis=1)] = 1.0
        else:
            z = scores / sel.temperature
            z = np.exp(z - z.max(axis=1, keepdims=True))
            probs = z / z.sum(axis=1, keepdims=True)
        return mix_epsilon(probs, mask, sel.epsilon)

    def outputs_and_probs(self, obs: NDArray[np.floating], mask: BoolArray) -> tuple[NDArray[np.float64], FloatArray]:
        """``outputs`` and ``action_probs`` from one pass of the network (serving needs both)."""
        obs, mask = check_inputs(obs, mask)
        raw = self._forward(obs)
        probs = self._network_probs(raw, mask)
        if self.served is not None and self.behaviour is not None:
            probs = self.served.combine(probs, self.behaviour.action_probs(obs, mask), mask, obs)
        return self._outputs(raw), probs


def load(path: str | Path) -> BundlePolicy:
    """Load a bundle folder as a :class:`BundlePolicy`, checking everything first."""
    path = Path(path)
    manifest_path = path / MANIFEST
    weights_path = path / WEIGHTS
    if not path.is_dir():
        raise BundleError(f"{path}: not a policy bundle folder")
    for required in (manifest_path, weights_path):
        _check_regular_file(required)
    try:
        with manifest_path.open("rb") as fh:
            content = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise BundleError(f"{manifest_path}: cannot be read ({err.strerror})") from None
    if len(content) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a bundle manifest, "
                          "refusing to read it")
    try:
        raw = json.loads(content.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, too many digits
        raise BundleError(f"{manifest_path}: not valid JSON ({_one_line(err)})") from None
    manifest = BundleManifest.from_json(raw, manifest_path)
    if manifest.spec_version != SPEC_VERSION:
        raise BundleError(f"{manifest_path}: bundle spec version {manifest.spec_version}, this carepath serves spec "
                          f"version {SPEC_VERSION} ({SPEC_CHANGES.get(SPEC_VERSION, 'features or actions changed')}): "
                          "retrain the policy (python train.py) on data of this version")
    if manifest.feature_names != list(FEATURE_NAMES):
        raise BundleError(f"{manifest_path}: field 'feature_names' does not match this carepath's features "
                          f"(bundle spec version {manifest.spec_version}, this carepath {SPEC_VERSION})")
    if manifest.action_names != list(ACTION_NAMES):
        raise BundleError(f"{manifest_path}: field 'action_names' does not match this carepath's actions")
    outputs_per_action = 2 if manifest.network.output == "q_bcq" else 1
    if manifest.network.n_in != len(FEATURE_NAMES) or manifest.network.n_out != outputs_per_action * len(
        ACTION_NAMES
    ):
        raise BundleError(f"{manifest_path}: network sizes {manifest.network.n_in} -> {manifest.network.n_out} "
                          f"do not match {len(FEATURE_NAMES)} features -> {len(ACTION_NAMES)} actions")
    tensors = _read_checked(weights_path, manifest.weights_sha256)
    for name, digest in manifest.files.items():
        _read_checked(path / name, digest)
    check_tensors(tensors, manifest.network, weights_path)
    network = PolicyNetwork(manifest.network)
    try:
        network.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise BundleError(f"{weights_path}: weights do not fit the network in {MANIFEST}: {_one_line(err)}") from None
    behaviour = None
    if BEHAVIOUR_FILE in manifest.files:
        try:
            behaviour = BehaviourModel.from_tensors(
                {k: v.numpy() for k, v in _read_checked(path / BEHAVIOUR_FILE, manifest.files[BEHAVIOUR_FILE]).items()})
        except ValueError as err:
            raise BundleError(f"{path / BEHAVIOUR_FILE}: {_one_line(err)}") from None
    return BundlePolicy(manifest, network, path, behaviour)


def patient_hashes(patient_ids: Any) -> NDArray[np.int64]:
    """64-bit hashes of (pseudonymised) patient ids, for recording who trained a policy without
    storing the ids themselves: sha256, first 8 bytes."""
    return np.array([int.from_bytes(hashlib.sha256(str(p).encode()).digest()[:8], "little", signed=True)
                     for p in patient_ids], dtype=np.int64)


def _check_regular_file(path: Path) -> None:
    """A bundle's files are regular files inside its folder: not links (to elsewhere), not missing."""
    if path.is_symlink():
        raise BundleError(f"{path}: is a symbolic link; a bundle's files must be regular files in its folder")
    if not path.is_file():
        raise BundleError(f"{path.parent}: missing {path.name}")


def check_tensors(tensors: Mapping[str, torch.Tensor], spec: NetworkSpec, weights_path: Path) -> None:
    """Refuse tensors (of ``weights_path``) that do not fit a :class:`PolicyNetwork` of ``spec``:
    names, shapes and dtypes exactly as the network has them, every value finite. Checked against
    a shape-only copy of the network, so that sizes in a tampered manifest never allocate memory.
    Also for networks kept in extra files (serving's benefit ensemble)."""
    where = f"{weights_path}: weights do not fit the network in {MANIFEST}"
    if spec.ensemble * (len(spec.hidden) + 1) > len(tensors):  # each layer of each head has its tensors
        raise BundleError(f"{where}: {len(tensors)} tensors for {spec.ensemble} head(s) of "
                          f"{len(spec.hidden) + 1} layers")
    with torch.device("meta"):
        expected = PolicyNetwork(spec).state_dict()
    problems = [f"missing tensor {k!r}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k!r}" for k in tensors if k not in expected]
    for key in expected.keys() & tensors.keys():
        want, got = expected[key], tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            problems.append(f"tensor {key!r} is {got.dtype} {tuple(got.shape)}, expected {want.dtype} "
                            f"{tuple(want.shape)}")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"tensor {key!r} holds NaN or infinite values")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BundleError(f"{where}: {'; '.join(sorted(problems)[:3])}{more}")


def _read_checked(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose sha256 must be ``expected_sha256``."""
    _check_regular_file(path)
    try:
        actual = sha256_file(path)
    except OSError as err:
        raise BundleError(f"{path}: cannot be read ({err.strerror})") from None
    if actual != expected_sha256:
        raise BundleError(f"{path}: sha256 {actual} does not match the recorded "
                          f"{expected_sha256}: the file was changed or corrupted; refusing to load")
    try:
        return load_file(str(path))  # safetensors: plain tensors, no code is executed
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise BundleError(f"{path}: not a safetensors file ({_one_line(err)})") from None


def update_bundle(
    path: str | Path,
    *,
    explain: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    certificate: dict[str, Any] | None = None,
    extra_tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    out: str | Path | None = None,
) -> BundlePolicy:
    """Re-save a bundle with new ``explain`` / ``evaluation`` sections and extra files.

    The weights stay as they are; the folder is rewritten atomically (a reader sees
    the old bundle or the new one, never a mix). Extra files not given are kept.
    ``out``: write the updated bundle there instead (a new folder; ``path`` is untouched).
    """
    policy = load(path)
    manifest = policy.manifest
    kept = {name: policy.extra_tensors(name) for name in manifest.files if name not in (extra_tensors or {})}
    if explain is not None:
        manifest.explain = explain
    if evaluation is not None:
        manifest.evaluation = evaluation
    if certificate is not None:
        manifest.certificate = certificate
    target = Path(out) if out is not None else Path(path)
    save_bundle(target, policy.network, manifest, overwrite=out is None,
                extra_tensors={**kept, **(extra_tensors or {})})
    return load(target)
