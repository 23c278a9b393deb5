"""The wire contract: every message's field names, numbers and types match LEYLINE.md."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor as F

from esper.leyline import pb

T = {
    "string": F.TYPE_STRING,
    "float": F.TYPE_FLOAT,
    "double": F.TYPE_DOUBLE,
    "uint32": F.TYPE_UINT32,
    "uint64": F.TYPE_UINT64,
    "bytes": F.TYPE_BYTES,
    "bool": F.TYPE_BOOL,
    "enum": F.TYPE_ENUM,
    "msg": F.TYPE_MESSAGE,
}

# message -> {field: (number, type)}; maps and well-known types are messages on the wire.
CONTRACT: dict[str, dict[str, tuple[int, str]]] = {
    "HardwareContext": {
        "device_type": (1, "string"),
        "device_id": (2, "string"),
        "total_memory_gb": (3, "float"),
        "available_memory_gb": (4, "float"),
        "temperature_celsius": (5, "float"),
        "utilization_percent": (6, "float"),
        "compute_capability": (7, "uint32"),
    },
    "SeedState": {
        "seed_id": (1, "string"),
        "stage": (2, "enum"),
        "gradient_norm": (3, "float"),
        "learning_rate": (4, "float"),
        "layer_depth": (5, "uint32"),
        "metrics": (6, "msg"),
        "age_epochs": (7, "uint32"),
        "risk_score": (8, "float"),
    },
    "SystemStatePacket": {
        "version": (1, "uint32"),
        "current_epoch": (2, "uint32"),
        "validation_accuracy": (3, "float"),
        "validation_loss": (4, "float"),
        "timestamp_ns": (5, "uint64"),
        "hardware_context": (6, "msg"),
        "training_metrics": (7, "msg"),
        "seed_states": (8, "msg"),
        "packet_id": (9, "string"),
        "global_step": (10, "uint64"),
        "training_loss": (11, "float"),
        "source_subsystem": (12, "string"),
        "training_run_id": (13, "string"),
        "experiment_name": (14, "string"),
        "conservative_mode": (50, "bool"),
        "rolled_back_commands": (51, "msg"),  # Tolaria extension
    },
    "CommandSeedOperation": {"operation": (1, "enum"), "blueprint_id": (2, "string"), "parameters": (3, "msg")},
    "CommandOptimizerAdjustment": {"optimizer_id": (1, "string"), "hyperparameters": (2, "msg")},
    "CommandCircuitBreaker": {"desired_state": (1, "enum"), "rationale": (2, "string")},
    "AdaptationCommand": {
        "version": (1, "uint32"),
        "command_id": (2, "string"),
        "command_type": (3, "enum"),
        "target_seed_id": (4, "string"),
        "execution_deadline_ms": (5, "uint32"),
        "issued_at": (6, "msg"),
        "issued_by": (7, "string"),
        "seed_operation": (10, "msg"),
        "optimizer_adjustment": (11, "msg"),
        "circuit_breaker": (12, "msg"),
        "rollback_payload": (13, "msg"),
        "annotations": (20, "msg"),
    },
    "EmergencySignal": {
        "version": (1, "uint32"),
        "level": (2, "enum"),
        "reason": (3, "string"),
        "origin": (4, "string"),
        "triggered_at": (5, "msg"),
        "monotonic_time_ms": (6, "uint64"),
        "run_id": (7, "string"),
        "attributes": (8, "msg"),
        "payload_checksum": (9, "bytes"),
    },
    "BusEnvelope": {"message_type": (1, "enum"), "payload": (2, "bytes"), "attributes": (3, "msg")},
    "EventEnvelope": {
        "event_id": (1, "string"),
        "event_type": (2, "string"),
        "source_subsystem": (3, "string"),
        "created_at": (4, "msg"),
        "processing_deadline": (5, "msg"),
        "ttl": (6, "msg"),
        "payload": (10, "bytes"),
        "payload_type": (11, "string"),
        "content_encoding": (12, "string"),
        "priority": (20, "enum"),
        "routing_keys": (21, "string"),
        "correlation_id": (22, "string"),
        "delivery_guarantee": (30, "enum"),
        "max_attempts": (31, "uint32"),
        "current_attempt": (32, "uint32"),
    },
    "MetricPoint": {"name": (1, "string"), "value": (2, "double"), "unit": (3, "string"), "attributes": (4, "msg")},
    "TelemetryEvent": {
        "event_id": (1, "string"),
        "description": (2, "string"),
        "level": (3, "enum"),
        "attributes": (4, "msg"),
    },
    "TraceSpan": {
        "span_id": (1, "string"),
        "parent_span_id": (2, "string"),
        "name": (3, "string"),
        "start_time": (4, "msg"),
        "end_time": (5, "msg"),
        "attributes": (6, "msg"),
    },
    "SystemHealth": {"status": (1, "enum"), "summary": (2, "string"), "indicators": (3, "msg")},
    "TelemetryPacket": {
        "packet_id": (1, "string"),
        "timestamp": (2, "msg"),
        "source_subsystem": (3, "string"),
        "level": (4, "enum"),
        "metrics": (10, "msg"),
        "events": (20, "msg"),
        "spans": (30, "msg"),
        "system_health": (40, "msg"),
    },
    "PerformanceBudgets": {
        n: (i + 1, "uint32")
        for i, n in enumerate(
            [
                "epoch_boundary_ms",
                "tamiyo_inference_ms",
                "systemstate_assembly_ms",
                "adaptation_processing_ms",
                "fast_rollback_ms",
                "full_rollback_seconds",
                "protobuf_serialization_us",
                "message_validation_us",
                "breaker_timeout_ms",
                "breaker_reset_seconds",
                "importance_tracking_overhead_percent",
                "checkpoint_analysis_minutes_min",
                "checkpoint_analysis_minutes_max",
                "structured_validation_seconds",
                "rollback_coordination_seconds",
            ]
        )
    },
    "SystemLimits": {
        n: (i + 1, "uint32")
        for i, n in enumerate(
            [
                "max_seeds_per_epoch",
                "max_message_size_bytes",
                "max_queue_depth",
                "max_retry_attempts",
                "max_pause_quota",
                "max_gc_allocations_per_msg",
                "max_pruning_ratio_percent",
                "max_consecutive_pruning_failures",
                "max_checkpoint_storage_gb",
                "max_importance_history_days",
            ]
        )
    },
}

ENUMS: dict[str, list[tuple[str, int]]] = {
    "SeedLifecycleStage": [
        (f"SEED_STAGE_{n}", i)
        for i, n in enumerate(
            "UNKNOWN DORMANT GERMINATED TRAINING BLENDING SHADOWING PROBATIONARY FOSSILIZED CULLED EMBARGOED RESETTING "
            "TERMINATED".split()
        )
    ],
    "SeedLifecycleGate": [
        (f"SEED_GATE_{n}", i)
        for i, n in enumerate(
            "UNKNOWN G0_SANITY G1_GRADIENT_HEALTH G2_STABILITY G3_INTERFACE G4_SYSTEM_IMPACT G5_RESET".split()
        )
    ],
    "HealthStatus": [
        (f"HEALTH_STATUS_{n}", i) for i, n in enumerate("UNKNOWN HEALTHY DEGRADED UNHEALTHY CRITICAL".split())
    ],
    "CircuitBreakerState": [(f"CIRCUIT_STATE_{n}", i) for i, n in enumerate("UNKNOWN CLOSED OPEN HALF_OPEN".split())],
    "CommandType": [
        (f"COMMAND_{n}", i)
        for i, n in enumerate(
            "UNKNOWN SEED ROLLBACK OPTIMIZER CIRCUIT_BREAKER PAUSE EMERGENCY STRUCTURAL_PRUNING".split()
        )
    ],
    "SeedOperation": [
        (f"SEED_OP_{n}", i)
        for i, n in enumerate(
            "UNKNOWN GERMINATE START_TRAINING START_GRAFTING STABILIZE EVALUATE FINE_TUNE FOSSILIZE CULL CANCEL".split()
        )
    ],
    "MessagePriority": [
        (f"MESSAGE_PRIORITY_{n}", i) for i, n in enumerate("UNSPECIFIED LOW NORMAL HIGH CRITICAL".split())
    ],
    "DeliveryGuarantee": [
        (f"DELIVERY_GUARANTEE_{n}", i) for i, n in enumerate("UNKNOWN AT_LEAST_ONCE AT_MOST_ONCE EXACTLY_ONCE".split())
    ],
    "TelemetryLevel": [
        (f"TELEMETRY_LEVEL_{n}", i) for i, n in enumerate("UNSPECIFIED INFO WARNING ERROR CRITICAL".split())
    ],
    "EmergencyLevel": [
        (f"EMERGENCY_LEVEL_{n}", i) for i, n in enumerate("UNSPECIFIED NOTICE ELEVATED CONSERVATIVE HALT".split())
    ],
    "BusMessageType": [
        (f"BUS_MESSAGE_TYPE_{n}", i)
        for n, i in [
            ("UNSPECIFIED", 0),
            ("SYSTEM_STATE", 1),
            ("ADAPTATION_COMMAND", 2),
            ("FIELD_REPORT", 3),
            ("TELEMETRY", 4),
            ("POLICY_UPDATE", 5),
            ("KERNEL_PREFETCH_REQUEST", 6),
            ("KERNEL_PREFETCH_READY", 7),
            ("KERNEL_PREFETCH_ERROR", 8),
            ("KERNEL_CATALOG_UPDATE", 9),
            ("EMERGENCY_SIGNAL", 10),
            ("BSDS_ISSUED", 20),
            ("BSDS_FAILED", 21),
            ("BENCHMARK_REPORT", 22),
        ]
    ],
}


def test_package_name_is_the_shared_one() -> None:
    assert pb.DESCRIPTOR.package == "esper.leyline.v1"
    assert pb.DESCRIPTOR.syntax == "proto3" if hasattr(pb.DESCRIPTOR, "syntax") else True


@pytest.mark.parametrize("message_name", sorted(CONTRACT))
def test_message_fields_match_the_contract_table(message_name: str) -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name[message_name]
    actual = {f.name: (f.number, f.type) for f in descriptor.fields}
    expected = {name: (num, T[kind]) for name, (num, kind) in CONTRACT[message_name].items()}
    assert actual == expected


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum_values_match_the_contract_table(enum_name: str) -> None:
    descriptor = pb.DESCRIPTOR.enum_types_by_name[enum_name]
    assert [(v.name, v.number) for v in descriptor.values] == ENUMS[enum_name]


def test_system_state_packet_reserves_100_to_199() -> None:
    descriptor = pb.DESCRIPTOR.message_types_by_name["SystemStatePacket"]
    # No field may live in the reserved range, and the proto declares the reservation.
    assert all(not 100 <= f.number <= 199 for f in descriptor.fields)
    source = pb.__file__.replace("leyline_pb2.py", "leyline.proto")
    with open(source, encoding="utf-8") as handle:
        assert "reserved 100 to 199;" in handle.read()


def test_tolaria_extensions_use_only_numbers_50_to_99_in_shared_messages() -> None:
    for name, fields in CONTRACT.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[name]
        extra = {f.number for f in descriptor.fields} - {num for num, _ in fields.values()}
        assert not extra, f"{name} has fields outside the contract table: {extra}"
        assert all(num < 50 or 50 <= num <= 99 for num, _ in fields.values())
