"""Building blocks written once against the Python array API standard (2024.12).

Where the array namespace comes from: a layer function takes `xp` (the namespace) as its first
argument, except the two that write into a cache pool (`attention.write_kv`,
`mamba2.mamba2_mixer`), which take the `backend` first instead because they need its
`scatter_rows` (a write the standard lacks; they read `backend.xp` from it); `linear.linear`
uses only `@` and `+` and takes neither, and `rotary.RotaryEmbedding` keeps the `xp` it is
built with. The models reach `norm.rms_norm`, `norm.layer_norm` and `activation.silu` through
their backend (`backend.rms_norm(x, weight, eps)`...), which may take its library's kernel
instead.
"""
