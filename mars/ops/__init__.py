"""The ops of mars in one package, imports running one way (docs/layers.md), bottom first:

- ``_ext``: loads the compiled ``mars._C`` and the Triton launchers (``mars_kernels``),
  registers fake implementations and the Triton custom ops, records why a backend is missing;
- ``groups``: labels -> dense indices and the input checks every advantage backend shares;
- ``reference``: the PyTorch specification every kernel matches;
- ``backends``: ``mars.backends()`` and the "auto" resolution;
- ``policy_loss``: the ``mars::policy_loss`` op wrapper;
- ``advantage`` and ``fused_linear``, then ``loss`` (the public loss module).

Nothing here imports from mars outside this package but the compiled ``mars._C`` and the
build record ``mars._build_info``. The public names stay where docs/README.md lists them:
``mars.reference``, ``mars.loss``, ``mars.advantage``, ``mars.groups``, ``mars.backends``,
``mars.fused_linear``, ``mars.policy_loss`` and ``mars._ext`` *are* these modules (each of
those files replaces itself in ``sys.modules`` by its module here), so an attribute read or
patched through either name is the same attribute. This package imports none of them on
import.
"""
