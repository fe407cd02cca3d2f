"""HF config.json files of the hub presets, bundled so the models can be built on the meta device
offline (`fedmllm inspect`; fedmllm.models.inspection reads them); transcribed from the
checkpoints' own config.json on the Hub."""
