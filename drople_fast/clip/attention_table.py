"""Measured attention dispatch table (written by bench/bench_attention_dispatch.py; do not edit by hand).

DEVICES: per device key, one entry per measured problem: fastest forward + backward round (ms) of
each candidate and the fastest one (``best``). MEASURED: where and how each device's entries were taken.
"""

DEVICES = {
    'cpu-AVX512': [
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 10, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 1.138, 'math': 7.895, 'explicit': 7.492}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 20, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 1.874, 'math': 7.82, 'explicit': 6.554}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 77, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 106.588, 'math': 207.878, 'explicit': 39.829}, 'best': 'explicit'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 10, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 9.205, 'math': 24.592, 'explicit': 24.164}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 20, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 17.712, 'math': 33.832, 'explicit': 46.649}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 77, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 180.405, 'math': 350.113, 'explicit': 289.078}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 4000, 'seq': 10, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 61.697, 'math': 241.885, 'explicit': 282.534}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 4000, 'seq': 20, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 236.943, 'math': 979.525, 'explicit': 712.558}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 48, 'seq': 201, 'causal': False, 'masked': False, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 49.766, 'math': 73.341, 'explicit': 75.266}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 384, 'seq': 201, 'causal': False, 'masked': False, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 413.441, 'math': 1119.127, 'explicit': 885.058}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 48, 'seq': 100, 'causal': False, 'masked': True, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 20.091, 'math': 111.375, 'explicit': 34.591}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 384, 'seq': 100, 'causal': False, 'masked': True, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 159.406, 'math': 587.431, 'explicit': 561.379}, 'best': 'sdpa'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 10, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 31.255, 'math': 1.979, 'explicit': 1.325, 'sdpa_fp32': 0.988}, 'best': 'sdpa_fp32'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 20, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 32.13, 'math': 3.064, 'explicit': 1.66, 'sdpa_fp32': 1.949}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 77, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 230.21, 'math': 348.568, 'explicit': 82.533, 'sdpa_fp32': 136.691}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 10, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 158.823, 'math': 22.34, 'explicit': 19.962, 'sdpa_fp32': 21.318}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 20, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 166.945, 'math': 236.184, 'explicit': 14.051, 'sdpa_fp32': 55.361}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 77, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 594.062, 'math': 725.313, 'explicit': 305.863, 'sdpa_fp32': 472.019}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 4000, 'seq': 10, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 793.841, 'math': 416.374, 'explicit': 261.391, 'sdpa_fp32': 264.628}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 4000, 'seq': 20, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 786.233, 'math': 355.951, 'explicit': 188.644, 'sdpa_fp32': 312.941}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 48, 'seq': 201, 'causal': False, 'masked': False, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 163.947, 'math': 86.942, 'explicit': 105.001, 'sdpa_fp32': 67.881}, 'best': 'sdpa_fp32'},
        {'dtype': 'bfloat16', 'batch_heads': 384, 'seq': 201, 'causal': False, 'masked': False, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 517.4, 'math': 726.998, 'explicit': 519.986, 'sdpa_fp32': 452.006}, 'best': 'sdpa_fp32'},
        {'dtype': 'bfloat16', 'batch_heads': 48, 'seq': 100, 'causal': False, 'masked': True, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 36.665, 'math': 55.897, 'explicit': 12.522, 'sdpa_fp32': 39.935}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 384, 'seq': 100, 'causal': False, 'masked': True, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 268.012, 'math': 230.703, 'explicit': 95.106, 'sdpa_fp32': 168.397}, 'best': 'explicit'},
    ],
}

MEASURED = {'cpu-AVX512': {'cpu': 'AMD EPYC, avx512_bf16',
                'torch': '2.14.1+cu130',
                'threads': 2,
                'rounds': 6,
                'loadavg': 7.2,
                'date': '2026-12-06 19:43 UTC'}}
