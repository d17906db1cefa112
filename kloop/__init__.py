"""kloop's shared contracts: the artifact format and registry (``kloop.artifact``) and the
generated Open Inference Protocol v2 messages (``kloop.pb``). Components import these; these
import no component."""

__version__ = "0.1.0"
