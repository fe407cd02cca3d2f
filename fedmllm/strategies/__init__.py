"""The server side of aggregation over adapter tensors: aggregate.py holds the pure math (no
flwr), validation.py the reply checks mixed into Flower's strategies (`adapter_strategy`). Each
aggregator's strategy is its algorithm's (fedmllm.algorithms)."""
