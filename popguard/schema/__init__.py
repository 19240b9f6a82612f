"""popguard's file formats, declared once: the config file and the policy files.

Each file is read the same way (:mod:`.nodes`): composed with PyYAML into a
node tree that keeps every value's position, turned into plain Python
values with a table from each value's path to its node, and validated by a
pydantic v2 model (``strict=True``, ``extra="forbid"``: :mod:`.config_models`,
:mod:`.policy_models`).  :mod:`.errors` maps every validation error back to
its node, in popguard's words, so each one reads ``file:line:column: error:
path: message``; :mod:`.issues` holds the one issue type both files use.

The JSON Schema of each model (``popguard config schema``) lets an editor
complete and check the files as they are written (docs/configuration.md).
"""
