"""The server side of aggregation over adapter tensors: aggregate.py holds the pure math (no
flwr), wrapper.py the wrapper that checks replies before the algorithm's Flower strategy sees them,
fused.py Flower's strategies over the one-pass weighted average (`fused`). Each
aggregator's strategy is its algorithm's (fedmllm.algorithms)."""
