# Sourced by scripts/gpu-check.sh and scripts/gpu-bench.sh (with OUT set, from the repository root):
# finds the temper binary (unpacking the carried target/release/temper.gz into $OUT), puts the
# CUDA toolkit's libraries on LD_LIBRARY_PATH, points NVRTC at its headers and the kernel cache
# into $OUT, and records the card in $OUT/card.txt. Sets BIN.
BIN=${TEMPER_BIN:-target/release/temper}
if [ ! -x "$BIN" ] && [ -f "$BIN.gz" ]; then
  gunzip -c "$BIN.gz" > "$OUT/temper" && chmod +x "$OUT/temper" && BIN="$OUT/temper"
fi
[ -x "$BIN" ] || { echo "error: no temper binary at $BIN (build with cargo build --release and carry it)" >&2; exit 2; }
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
export TEMPER_CUDA_INCLUDE=${TEMPER_CUDA_INCLUDE:-/usr/local/cuda/include}
export TEMPER_KERNEL_CACHE=${TEMPER_KERNEL_CACHE:-$OUT/kernel-cache}
export CI=true   # no progress bars in logs
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/card.txt" 2>/dev/null ||
  echo "no nvidia-smi on this machine" > "$OUT/card.txt"
echo "card: $(cat "$OUT/card.txt")"
