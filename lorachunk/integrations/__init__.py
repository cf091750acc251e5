"""Bridges to the libraries LoRA users already load with. Each module imports its library; this
package imports nothing, so ``import lorachunk`` stays light.

- :mod:`lorachunk.integrations.diffusers`: ``load_lora(pipe, source, splits=…, scales=…)``
"""
