"""Client side. Deliberately empty: a deployment starts one `flwr-clientapp` process per message,
which imports `fedmllm.client.app` and, through this package, nothing heavier than what it uses.

- `app`: the Flower ClientApp (messages in and out, Flower's mods)
- `request`: `TrainRequest`, what a message hands the client as plain Python
- `rounds`: the client's round: local data, training, evaluation on its own split
- `local`: the algorithm-shaped state of one round (`LocalRound`, `ClientStore`)
- `worker`: the SuperNode's long-lived training process (deployment)
"""
