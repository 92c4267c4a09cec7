"""rdt-interp: Refusal Direction Transfer, traced and tested.

Load a chat LM or a VLA (``rdt_interp.models``), capture and edit its residual stream
(``rdt_interp.tracing``), extract refusal directions (``rdt_interp.directions``), analyse them
(``rdt_interp.analysis``) and draw paper figures from saved results (``rdt_interp.viz``).
"""

__version__ = "0.1.0"
