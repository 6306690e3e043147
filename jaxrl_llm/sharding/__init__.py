"""Mesh construction, logical-axis rules and sharded parameter creation."""

from jaxrl_llm.sharding.mesh import DEFAULT_AXES, make_mesh, resolve_axis_sizes, set_cpu_devices
from jaxrl_llm.sharding.rules import (
    DEFAULT_RULES, ReplicationReport, ShardingEnv, check_replication, constrain, current_env,
    logical_to_sharding, logical_to_spec, normalize_rules, parameter_axes, replication_report)

__all__ = [
    "DEFAULT_AXES", "DEFAULT_RULES", "ReplicationReport", "ShardingEnv", "check_replication",
    "constrain", "current_env", "logical_to_sharding", "logical_to_spec", "make_mesh",
    "normalize_rules", "parameter_axes", "replication_report", "resolve_axis_sizes", "set_cpu_devices",
]
