"""Images in, tensors out: reading and the single ``preprocess()`` (``imageio``, numpy + Pillow only: the line runtime
uses it), dataset layouts (``layouts``), torch datasets, the validation split and the labelled test set
(``datasets``), synthetic anomalies for training (``anomalies``) and the generated datasets of ``anoddpm synth``
(``synth``, ``frames``). Importing this package imports no torch."""
