"""Images: read and processed by the model's own processor in the TokenizerManager
(``processor.py``), sent as raw tensor bytes (``srt/runtime/image_inputs.py``), encoded by the model's own
vision tower in the scheduler (``encoder.py``)."""
