import warnings

import torch

# CI has 2 cores; tiny tensors gain nothing from intra-op threads, and OpenMP regions on a loaded
# machine cost milliseconds each.
torch.set_num_threads(1)

# torch's own modules call the deprecated torch.jit.script/script_method when first imported: forward-mode
# AD's decompositions (on the first make_dual) and torch.utils.mkldnn (on the first torch.compile). Imported
# here, once, with those warnings off (a DeprecationWarning in torch 2.13, a FutureWarning in 2.14), so that
# the suite shows only warnings about our own calls.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", r"`torch\.jit\.script(_method)?` is deprecated")
    import torch._decomp.decompositions_for_jvp  # noqa: F401
    import torch.utils.mkldnn  # noqa: F401
