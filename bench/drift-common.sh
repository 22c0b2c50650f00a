# Sourced by bench/finetune-drift.sh and bench/pretrain-drift.sh: their settings, the built CLI, the emoji-labels data
# and its three styles (Noto, Twemoji, OpenMoji), each with a train and a test split.
FROM=${FROM:?set FROM to a pre-training run folder or checkpoint}
STEPS=${STEPS:-300}
REPLAY=${REPLAY:-0}
MAMO=(${MAMO:-dotnet src/Mamo.Cli/bin/Release/net10.0/linux-x64/mamo.dll})
[ -n "${MAMO_BUILT:-}" ] || dotnet build src/Mamo.Cli -c Release -v q -nologo >/dev/null
DATA=${MAMO_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/mamo}
"${MAMO[@]}" datasets fetch emoji-labels >/dev/null
rm -rf "$OUT" && mkdir -p "$OUT"
styles=(noto twitter openmoji)
train=(train twitter-train openmoji-train)
test=(test twitter-test openmoji-test)
