#!/bin/bash
# The GPU decoder's tests of workloads/tests/decoder.rs (module `gpu`) on
# the GPU: each runs the candle graph on candle's CPU backend and on GPU 0
# against the CPU decoder, including the sink-window read rule.
set -u
D=$PWD/dist/gd
gunzip -f $D/decoder-tests.gz; chmod +x $D/decoder-tests
N=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])")
export LD_LIBRARY_PATH=$N/cu13/lib:${LD_LIBRARY_PATH:-}
mkdir -p $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
(cd $D && timeout 300 ./decoder-tests --test-threads 1 --nocapture gpu:: 2>&1) > $OUT/decoder-gpu-tests.txt
grep -E "test |diff|window|verification|result|panicked|error" $OUT/decoder-gpu-tests.txt
