"""The fixed value sets of the run's settings (topologies, sample keys, graphs, admission modes)."""

TOPOLOGIES = ("gossip", "modest", "fl", "dpsgd")
#: Topologies whose nodes send whole models to each other (no update both sides could decode against).
MODEL_TOPOLOGIES = ("gossip", "dpsgd")
SAMPLE_KEYS = ("model", "round")
DPSGD_GRAPHS = ("exponential", "regular")
#: Admission modes (`p2pnode.transport.admission`), the first one the default.
ADMISSION_MODES = ("open", "secret", "allowlist")
#: What the DiLoCo outer step does in the rounds of a synchronisation warm-up, the first the default
#: (`p2pnode.aggregation.WARMUP_OUTER`, the same values).
SYNC_WARMUP_OUTER = ("outer", "reset", "sgd", "plain")
