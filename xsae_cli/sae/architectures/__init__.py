"""The built-in SAE architectures, one file each; every file ends in its registration line.

To add an architecture, add one file here: a :class:`~xsae_cli.sae.base.SparseAutoencoder`
subclass (``_codes`` for inference, ``_train`` for the loss) and one
:func:`~xsae_cli.sae.registry.register_sae_class` call declaring what the rest of xsae needs
(uses k, SAELens / sparsify names, extra tensors, loss coefficients, options). The registry
imports every module of this package on its first lookup, so the file is not listed anywhere;
the config, trainer, file formats, PEFT tuner and CLI pick it up from its registration.
"""
