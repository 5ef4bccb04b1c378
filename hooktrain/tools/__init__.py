"""The user tools around training: ``data check``, ``data convert`` (with palettes), ``plot``,
``browse`` and ``benchmark``. Training never imports them.
"""
