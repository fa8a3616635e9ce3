"""`NodeConfig`: everything one node needs to take part in a run, composed of the settings sections, and
validated once at start; its `NodeConfig.config_hash` keeps peers of different run-wide settings apart."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from p2pnode.config.admission import AdmissionSettings
from p2pnode.config.byzantine import ByzantineSettings
from p2pnode.config.choices import DPSGD_GRAPHS, MODEL_TOPOLOGIES, SAMPLE_KEYS, SYNC_WARMUP_OUTER, TOPOLOGIES
from p2pnode.config.limits import LimitSettings
from p2pnode.config.network import NetworkSettings
from p2pnode.config.run import NodeSettings, RunSettings
from p2pnode.config.schema import MASK, SECRET_KEYS, field_default, schema
from p2pnode.config.secagg import SecaggSettings
from p2pnode.config.topology import DpsgdSettings, ModestSettings
from p2pnode.config.training import DilocoSettings, TrainingSettings
from p2pnode.errors import ConfigError


# dataclasses collect fields along the reversed MRO: the last base's fields come first, so the sections
# are listed here in the reverse of their order in `schema()` (run, training, node, network, modest, diloco,
# secagg, byzantine, admission, dpsgd, limits).
@dataclass
class NodeConfig(LimitSettings, DpsgdSettings, AdmissionSettings, ByzantineSettings, SecaggSettings, DilocoSettings,
                 ModestSettings, NetworkSettings, NodeSettings, TrainingSettings, RunSettings):
    """Everything one node needs to take part in a run: every settings section (`schema` lists their fields,
    each field reachable as ``config.<field>``).

    Run-wide keys (equal on every peer, hashed into `config_hash`): `run_id`, `task`, `task_options`,
    `topology`, `rule`, `model_seed_mode`, and the `Setting.hashed` fields of the run's topology. The rest is
    local to the node.
    """

    def validate(self) -> NodeConfig:
        """Check every value once; raise `ConfigError` naming the key and the allowed values."""
        if self.topology not in TOPOLOGIES:
            raise ConfigError(f"topology={self.topology!r} is not supported; allowed: {', '.join(TOPOLOGIES)}")
        if self.model_seed_mode not in ("shared", "independent"):
            raise ConfigError(f"model_seed_mode={self.model_seed_mode!r}; allowed: shared, independent")
        index, count = self.shard
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard={index}/{count}: need 0 <= index < count")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha}: must be > 0 (or unset for IID)")
        for key in ("local_steps", "batch_size", "sync_warmup_local_steps"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key}={v}: must be >= 1")
        if self.sync_warmup_steps < 0:
            raise ConfigError(f"sync_warmup_steps={self.sync_warmup_steps}: must be >= 0 (0: no warm-up)")
        if self.sync_warmup_steps > 0 and self.sync_warmup_local_steps is None:
            raise ConfigError(f"sync_warmup_steps={self.sync_warmup_steps} needs sync_warmup_local_steps "
                              "(the local steps of a warm-up round)")
        if self.sync_warmup_outer not in SYNC_WARMUP_OUTER:
            raise ConfigError(f"sync_warmup_outer={self.sync_warmup_outer!r}; allowed: {', '.join(SYNC_WARMUP_OUTER)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if self.rounds is not None and self.rounds < 0:
            raise ConfigError(f"rounds={self.rounds}: must be >= 0")
        for key in ("exchange_timeout_s", "announce_ttl_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be > 0")
        if self.directory_max_subkeys < 1:
            raise ConfigError(f"directory_max_subkeys={self.directory_max_subkeys}: must be at least 1")
        if self.directory_read_interval_s < 0:
            raise ConfigError(f"directory_read_interval_s={self.directory_read_interval_s}: must be >= 0")
        if self.wait_for_peers < 0:
            raise ConfigError(f"wait_for_peers={self.wait_for_peers}: must be >= 0")
        if self.min_round_time_s < 0:
            raise ConfigError(f"min_round_time_s={self.min_round_time_s}: must be >= 0")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port={self.port}: must be in 0..65535")
        from p2pnode.aggregation import available_rules  # local: config is a leaf module

        if self.rule not in available_rules():
            raise ConfigError(f"rule={self.rule!r} is unknown; allowed: {', '.join(available_rules())}")
        self._validate_topology_settings()
        self._validate_byzantine_settings()
        self._validate_admission()
        self._validate_limits()
        return self


    def _validate_byzantine_settings(self) -> None:
        if self.attack is not None:
            from p2pnode.attacks import attack_info, available_attacks  # local: config is a leaf module
            from p2pnode.errors import AggregationError

            if self.attack not in available_attacks():
                raise ConfigError(f"attack={self.attack!r} is unknown; allowed: {', '.join(available_attacks())}")
            unknown = sorted(set(self.attack_params) - set(attack_info(self.attack).params))
            if unknown:
                allowed = ", ".join(attack_info(self.attack).params) or "none"
                raise ConfigError(f"attack_params {unknown} are not parameters of {self.attack}; allowed: {allowed}")
            try:
                for k, v in self.attack_params.items():
                    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
                        raise AggregationError(f"attack parameter {k}={v!r}: must be a number")
            except AggregationError as e:
                raise ConfigError(str(e)) from e
        elif self.attack_params:
            raise ConfigError(f"attack_params={self.attack_params} given without an attack")
        if self.robust_window is not None and self.robust_window < 1:
            raise ConfigError(f"robust_window={self.robust_window}: must be >= 1")
        if self.robust_window is not None and self.topology != "gossip":
            raise ConfigError(f"robust_window={self.robust_window} needs topology gossip (got {self.topology!r}); "
                              "modest and fl aggregators apply the rule to their sample's models")
        if self.exclude_suspects and self.topology == "dpsgd":
            raise ConfigError("exclude_suspects needs topology gossip, modest or fl: dpsgd does not score peers")
        if not 0.0 <= self.suspicion_decay < 1.0:
            raise ConfigError(f"suspicion_decay={self.suspicion_decay}: must be in [0, 1)")
        if not self.suspect_threshold > 0:
            raise ConfigError(f"suspect_threshold={self.suspect_threshold}: must be > 0")

    def _validate_topology_settings(self) -> None:
        for key in ("sample_size", "aggregators", "liveness_min", "inactivity_threshold", "dpsgd_degree"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= 1")
        if self.max_topups < 0:
            raise ConfigError(f"max_topups={self.max_topups}: must be >= 0")
        if self.join_fanout is not None and self.join_fanout < 1:
            raise ConfigError(f"join_fanout={self.join_fanout}: must be >= 1 (or unset for min(10 * s, view))")
        if not 0 < self.success_fraction <= 1:
            raise ConfigError(f"success_fraction={self.success_fraction}: must be in (0, 1]")
        for key in ("aggregation_timeout_s", "ping_timeout_s", "ping_interval_s", "idle_timeout_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}={getattr(self, key)}: must be > 0")
        if self.sample_key not in SAMPLE_KEYS:
            raise ConfigError(f"sample_key={self.sample_key!r}; allowed: {', '.join(SAMPLE_KEYS)}")
        if self.dpsgd_graph not in DPSGD_GRAPHS:
            raise ConfigError(f"dpsgd_graph={self.dpsgd_graph!r}; allowed: {', '.join(DPSGD_GRAPHS)}")
        self._validate_diloco()
        self._validate_secagg()
        if self.topology == "modest" and self.aggregators > self.sample_size:
            raise ConfigError(f"aggregators={self.aggregators} exceeds sample_size={self.sample_size}; "
                              f"allowed: 1..{self.sample_size}")

    def _validate_diloco(self) -> None:
        if self.outer_lr is not None:
            if isinstance(self.outer_lr, bool) or not (isinstance(self.outer_lr, int | float)
                                                       and math.isfinite(self.outer_lr) and self.outer_lr > 0):
                raise ConfigError(f"outer_lr={self.outer_lr!r}: must be a finite number > 0 (DiLoCo uses 0.7; 1 with "
                                  f"outer_momentum=0 is the plain merge), or unset for no outer optimizer")
            if not (isinstance(self.outer_momentum, int | float) and 0 <= self.outer_momentum < 1):
                raise ConfigError(f"outer_momentum={self.outer_momentum!r}: must be in [0, 1) (DiLoCo uses 0.9)")
        from p2pnode.transport.compression import check_combination, parse_compression  # local: a leaf module

        try:
            c = parse_compression(self.compression)
        except ValueError as e:
            raise ConfigError(f"compression: {e}") from None
        try:
            check_combination(c, secagg=self.secagg,
                              payload="models" if self.topology in MODEL_TOPOLOGIES else "updates")
        except ValueError as e:  # ConfigError is a ValueError
            why = ""
            if self.topology in MODEL_TOPOLOGIES and c.sparse:
                why = (f" (topology {self.topology} publishes each node's trained model, and every receiver forms the "
                       f"pseudo-gradient against its own round-start model, so no update exists to sparsify; topk fits "
                       f"modest/fl trainer updates)")
            raise ConfigError(f"compression={self.compression!r}: {e}{why}") from None
        # The canonical text (``INT8`` and ``int8:1024`` are ``int8``): peers that mean the same format hash alike.
        self.compression = str(c)
        from p2pnode.transport.compression import AUTO, model_format  # local: a leaf module

        try:
            m = model_format(c, self.model_compression)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.model_compression = AUTO if self.model_compression.strip().lower() == AUTO else str(m)

    def _validate_secagg(self) -> None:
        if not self.secagg:
            if self.secagg_groups != 1:
                raise ConfigError(f"secagg_groups={self.secagg_groups} splits the secure aggregation of a sample "
                                  f"into groups, but secagg is off; turn it on (--secagg) or leave 1")
            return
        if self.topology not in ("modest", "fl"):
            raise ConfigError(f"secagg needs topology modest or fl, where an aggregator combines the updates of a "
                              f"sample; {self.topology!r} has no such aggregator (peers exchange whole models), so "
                              f"turn secagg off or use --topology modest")
        from p2pnode.secagg.groups import check_groups  # local: config is a leaf module
        from p2pnode.secagg.settings import SUM_RULES

        if self.secagg_groups < 1:
            raise ConfigError(f"secagg_groups={self.secagg_groups}: must be >= 1")
        if self.secagg_groups == 1 and self.rule not in SUM_RULES:
            raise ConfigError(f"rule={self.rule!r} cannot run with secagg: it needs each update in the clear, but "
                              f"with secagg the aggregator of a sample sees only the sum of the updates; allowed "
                              f"rules with secagg: {', '.join(SUM_RULES)} (or split each sample into secure "
                              f"groups with --secagg-groups G and apply {self.rule!r} across the group means, "
                              f"or turn secagg off)")
        if self.secagg_neighbours is not None and self.secagg_neighbours < 1:
            raise ConfigError(f"secagg_neighbours={self.secagg_neighbours}: must be >= 1 (or unset for the default)")
        if self.sample_size < 2:
            raise ConfigError(f"secagg needs sample_size >= 2 (a sum of one update is that update), got "
                              f"{self.sample_size}")
        if self.secagg_threshold is not None:
            quorum = max(1, math.floor(self.success_fraction * self.sample_size + 1e-9))
            if not 2 <= self.secagg_threshold <= quorum:
                raise ConfigError(f"secagg_threshold={self.secagg_threshold}: must be in 2..{quorum} "
                                  f"(floor(success_fraction * sample_size)): an aggregator cannot complete with "
                                  f"fewer updates than that anyway")
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
            raise ConfigError(f"secagg_clip={self.secagg_clip}: must be a finite number > 0")
        if self.secagg_min_group < 2:
            raise ConfigError(f"secagg_min_group={self.secagg_min_group}: must be >= 2 (a secure sum of one member is "
                              f"that member's update)")
        if self.secagg_groups > 1:
            check_groups(self.rule, self.rule_params, self.secagg_groups, self.sample_size, self.secagg_threshold,
                         min_group=self.secagg_min_group)
            if self.topology == "modest" and 1 < self.secagg_groups < self.aggregators:
                raise ConfigError(f"secagg_groups={self.secagg_groups} with aggregators={self.aggregators}: the groups "
                                  f"are spread over the aggregators (group g at aggregator g mod a), so each "
                                  f"aggregator needs one; use secagg_groups >= {self.aggregators} or fewer "
                                  f"aggregators")

    def run_fields(self) -> dict[str, Any]:
        """The run-wide fields (equal on every peer of a run): exactly what `config_hash` hashes.

        These are the fields whose `Setting.hashed` is set, those of other topologies left out. The secure
        aggregation fields count only when secagg is on, and ``secagg_groups``/``secagg_min_group`` only
        when there is more than one group, so that the hash of runs made before they existed stays as it was;
        likewise the fields with a `Setting.hash_when` (`CONDITIONAL_RUN_KEYS`: the outer optimizer on gossip
        and dpsgd, the compression) count only when their deciding field is set.
        """
        keys = [*RUN_KEYS, *TOPOLOGY_RUN_KEYS.get(self.topology, ())]
        for key, decider in CONDITIONAL_RUN_KEYS.get(self.topology, {}).items():
            if getattr(self, decider) != _DEFAULTS[decider]:
                keys.append(key)
        if self.secagg:
            keys += SECAGG_RUN_KEYS
            if self.secagg_groups != 1:
                keys += ["secagg_groups", "secagg_min_group"]
        return {k: getattr(self, k) for k in keys}

    @property
    def config_hash(self) -> str:
        """SHA-256 (hex, first 16 chars) of the run-wide keys (`run_fields`)."""
        blob = json.dumps(self.run_fields(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        """Every field, with the run secret and key masked (``***``)."""
        out = dataclasses.asdict(self)
        for key in SECRET_KEYS:
            if out.get(key):
                out[key] = MASK
        return out



def _hashed(section_not: str, topology: str | None) -> tuple[str, ...]:
    return tuple(f.name for f, meta in schema() if meta.hashed and meta.section != section_not
                 and (not meta.hash_when or (topology is not None and topology in meta.hash_always))
                 and (meta.topologies == () if topology is None else topology in meta.topologies))


def _conditional(topology: str) -> dict[str, str]:
    return {f.name: meta.hash_when for f, meta in schema() if meta.hashed and meta.hash_when
            and topology not in meta.hash_always and (meta.topologies == () or topology in meta.topologies)}


_DEFAULTS: dict[str, Any] = {f.name: field_default(f) for f, _ in schema()}


#: Keys that must be equal on all peers of a run: a peer whose hash of these differs is not used (`Setting.hashed`).
RUN_KEYS: tuple[str, ...] = _hashed("secagg", None)
#: Further run-wide keys, per topology (hashed only for that topology, so other runs keep their hash).
TOPOLOGY_RUN_KEYS: dict[str, tuple[str, ...]] = {t: keys for t in TOPOLOGIES if (keys := _hashed("secagg", t))}
#: Run-wide keys hashed only when their deciding field is not at its default (`Setting.hash_when`), per topology:
#: key -> deciding field.
CONDITIONAL_RUN_KEYS: dict[str, dict[str, str]] = {t: cond for t in TOPOLOGIES if (cond := _conditional(t))}
#: Run-wide keys of secure aggregation, hashed when it is on (the group keys only with more than one group).
SECAGG_RUN_KEYS: tuple[str, ...] = tuple(f.name for f, meta in schema() if meta.hashed and meta.section == "secagg"
                                         and f.name not in ("secagg_groups", "secagg_min_group"))
