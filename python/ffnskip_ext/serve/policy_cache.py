"""Skip policies named by requests (``"ffnskip": {"policy": ...}``) and by the server.

A request may give a policy object (the JSON of ``Policy.to_json``) or one of the names
"dense", "ffn-skip" and "first" (the FiRST routers next to the served model); it may not
name files on the server, so a FiRST object takes those routers too. Each distinct request
policy is made once and kept: equal requests then get the same ``Policy`` value, which lets
a worker keep its cache (a FiRST policy compares its routers by identity).
"""

from __future__ import annotations

import collections
import json
from typing import Any

from .. import _core
from ..runtime.policies import (
    POLICY_FORMAT_VERSION,
    DensePolicy,
    FiRSTPolicy,
    Policy,
    load_policy,
)
from ..runtime.routers import model_routers
from .errors import bad_request

NAMES = ("dense", "ffn-skip", "ffn_skip", "first")
PARAM = "ffnskip.policy"


def server_policy(spec: Policy | str | None, model_path: str) -> Policy:
    """The server's default: a Policy, None (dense), "first" or what ``load_policy`` takes
    (a JSON file, too)."""
    if isinstance(spec, Policy):
        return spec
    if spec is None:
        return DensePolicy()
    return FiRSTPolicy.for_model(model_path) if spec == "first" else load_policy(spec)


class PolicyCache:
    """Request policies checked against the model, the most recent ``size`` kept. Used from
    one thread (the server's request-preparation thread)."""

    def __init__(self, model_path: str, num_layers: int, default: Policy, size: int = 64) -> None:
        self.model_path = model_path
        self.num_layers = num_layers
        self.default = default
        self.size = size
        self._policies: collections.OrderedDict[str, Policy] = collections.OrderedDict()

    def resolve(self, spec: str | dict[str, Any] | None) -> Policy:
        if spec is None:
            return self.default
        key = json.dumps(spec, sort_keys=True)
        if key in self._policies:
            self._policies.move_to_end(key)
            return self._policies[key]
        policy = self._make(spec)
        try:  # what set_policy would refuse for this model, before the request is queued
            _core.validate_policy(self.num_layers, **policy.engine_args(self.num_layers))
        except ValueError as e:
            raise bad_request(f"ffnskip.policy: {e}", PARAM) from e
        self._policies[key] = policy
        if len(self._policies) > self.size:
            self._policies.popitem(last=False)
        return policy

    def _make(self, spec: str | dict[str, Any]) -> Policy:
        if isinstance(spec, str):
            if spec not in NAMES:
                raise bad_request(f"ffnskip.policy: unknown policy name {spec!r} (known: "
                                  f"{', '.join(NAMES)}, or a policy object)", PARAM)
            if spec != "first":
                return load_policy(spec)
            spec = {"kind": FiRSTPolicy.kind, "version": POLICY_FORMAT_VERSION}
        if spec.get("kind") == FiRSTPolicy.kind:
            if "routers" in spec:
                raise bad_request("ffnskip.policy: a request cannot name a router file; a "
                                  "FiRST policy uses the routers next to the served model",
                                  PARAM)
            routers = model_routers(self.model_path)
            if routers is None:
                raise bad_request("ffnskip.policy: the served model has no FiRST routers",
                                  PARAM)
            spec = {**spec, "routers": routers}
        try:
            return load_policy(spec)
        except (ValueError, TypeError) as e:  # TypeError: e.g. a list where a name belongs
            raise bad_request(f"ffnskip.policy: {e}", PARAM) from e
