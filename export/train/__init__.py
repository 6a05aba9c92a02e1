"""Training the demo versions: the ``tiny`` M2FP trained from scratch on the figure generator's labeled scenes
with the Mask2Former set loss, on the CPU, seeded (``python -m m2fpkit.export.train``, ``make train-demo``).

One module per job: ``data`` (scenes → the runtime's input and M2FP's targets), ``matcher`` (Hungarian
matching), ``set_loss`` (class + mask + dice over matched pairs), ``taps`` (the decoder's auxiliary
predictions, by hooks: the exported graph is untouched), ``loop`` (optimiser, schedule, precise BN,
checkpoints), ``evaluate`` (held-out grades through the runtime's pre/postprocessing), ``recipes`` (which run
makes which version), ``weights_dir`` (a checkpoint as a ModelScope model directory with its training log),
``run`` (recipes in processes) and ``__main__`` (the command line).
"""
