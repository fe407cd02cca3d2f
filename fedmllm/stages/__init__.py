"""MLLM-FL's server-side stages on the server's public pool (disjoint from every client's data):

- vision.py, stage 1 (`server_stage.pretrain`): the vision tower and projector learn to make image
  tokens mean something to the frozen language model, before round 1;
- adapter.py, adapter pre-training (`server_stage.pretrain.lora`): the initial global adapter,
  trained on the public questions with each image's caption as text (a CheckGate decides when
  it scores its held-out questions and stops);
- align.py, global alignment (`server_stage.align`): after aggregation, a few steps on the public
  task samples;
- cache.py, where their results live (keyed by everything that shapes them); captions.py, their data.

Every stage trains through fedmllm.training's one loop (`optimize`; `train_steps` for the adapter).
No flwr (bench/gpu.py runs the stages on a GPU machine without it). This package file imports
nothing, so the ClientApp can read `stages.cache` without loading the trainers.
"""
