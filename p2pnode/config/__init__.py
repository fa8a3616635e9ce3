"""Run and node configuration: one typed dataclass, `NodeConfig`, validated once at start.

Its fields are grouped in sections, each a dataclass of its own module (`run`, `training`, `network`,
`topology`, `secagg`, `byzantine`, `admission`, `limits`), which `NodeConfig` (`node_config`) inherits, so
every field is ``config.<field>``. Each field carries a `Setting` (`schema`), from which the CLI options,
TOML keys, ``P2PNODE_*`` variables and docs/config.md are generated. The daemon's own node-local settings
are `p2pnode.daemon.settings.DaemonSettings`.
"""

from p2pnode.config.admission import AdmissionSettings
from p2pnode.config.byzantine import ByzantineSettings
from p2pnode.config.choices import ADMISSION_MODES, DPSGD_GRAPHS, MODEL_TOPOLOGIES, SAMPLE_KEYS, TOPOLOGIES
from p2pnode.config.limits import LimitSettings
from p2pnode.config.network import NetworkSettings
from p2pnode.config.node_config import (
    _DEFAULTS,
    CONDITIONAL_RUN_KEYS,
    RUN_KEYS,
    SECAGG_RUN_KEYS,
    TOPOLOGY_RUN_KEYS,
    NodeConfig,
)
from p2pnode.config.run import NodeSettings, RunSettings
from p2pnode.config.schema import (
    _UNSET,
    MASK,
    SECRET_KEYS,
    SECTIONS,
    Setting,
    field_default,
    schema,
    setting,
    setting_of,
)
from p2pnode.config.secagg import SecaggSettings
from p2pnode.config.topology import DpsgdSettings, ModestSettings
from p2pnode.config.training import DilocoSettings, TrainingSettings

__all__ = [
    "ADMISSION_MODES", "CONDITIONAL_RUN_KEYS", "DPSGD_GRAPHS", "MASK", "MODEL_TOPOLOGIES", "RUN_KEYS", "SAMPLE_KEYS",
    "SECAGG_RUN_KEYS", "SECRET_KEYS", "SECTIONS", "TOPOLOGIES", "TOPOLOGY_RUN_KEYS", "_DEFAULTS", "_UNSET",
    "AdmissionSettings", "ByzantineSettings", "DilocoSettings", "DpsgdSettings", "LimitSettings", "ModestSettings",
    "NetworkSettings", "NodeConfig", "NodeSettings", "RunSettings", "SecaggSettings", "Setting", "TrainingSettings",
    "field_default", "schema", "setting", "setting_of",
]
