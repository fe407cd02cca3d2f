"""HF config.json files of the hub presets, bundled so the models can be built on the meta device
offline (`fedmllm inspect`; fedmllm.models.inspection reads them); transcribed from the
checkpoints' own config.json on the Hub.

Next to each, <preset>.processor.json holds the checkpoint's image-processor settings
(preprocessor_config.json as "image_processor", processor_config.json as "processor") and the
special-token strings its processor needs, so a processor with the real resolution logic can be
built offline; its "_source" field says where the values come from."""
