"""fedmllm: federated fine-tuning of multimodal LLMs on Flower."""

__version__ = "0.1.0"
