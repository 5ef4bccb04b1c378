"""The recipe: one YAML file (``_base_`` composition, ``--cfg-options``) validated into
:class:`~hooktrain.recipe.schema.Recipe`, whose sections are defined here (``data``, ``model``,
``optimizer``/``schedule``, ``train``, ``hooks``). Nothing here imports torch.
"""
