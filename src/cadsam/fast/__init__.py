"""Everything that exists only for speed or memory.

:mod:`.runtime` holds the settings (a :class:`~cadsam.fast.runtime.Runtime`: which paths run)
and imports nothing of the model, so a method may name them; :func:`.runner.fit` applies them
to a model. The paths themselves: :mod:`.adapter` (CAD in bands or Triton kernels),
:mod:`.graphs` (the CUDA-graph training step), :mod:`.compiler`. Each is tested equal to the
plain path.
"""
