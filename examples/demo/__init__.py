"""The demo model: procedural shapes data, a pixel checker, training and the quality report.

The embedded default model is trained here on CPU (see `examples.demo.train`) so that a
fresh clone draws the prompted shape without a network; `quality` then measures what each
quantization backend costs in prompt adherence and pixel fidelity.
"""
