"""Adapter-only strategies; aggregate.py holds the pure math."""

from fedmllm.strategies.fedavg import AdapterFedAvg

__all__ = ["AdapterFedAvg"]
