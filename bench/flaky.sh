#!/usr/bin/env bash
# Flake hunt: runs one test class N times in a row and prints each run's failures, then the count.
# A test that fails in any run is a bug in the test or the product (docs/TESTING.md), never noise.
#
#   bash bench/flaky.sh KafkaTests 10
#   bash bench/flaky.sh Mamo.Cli.Tests.ClusterTests 10
set -euo pipefail
cd "$(dirname "$0")/.."
CLASS=${1:?usage: bench/flaky.sh CLASS [N]}
N=${2:-10}
name=${CLASS##*.}
project=$(grep -lE "class ${name}\b" tests/*/*.cs | head -1 | xargs -r dirname)
[ -n "$project" ] || { echo "no test class $name under tests/" >&2; exit 2; }
# A fully qualified name filters exactly; a bare one, by the class's namespace.
filter="FullyQualifiedName~$(basename "$project").${name}."
[[ "$CLASS" == *.* ]] && filter="FullyQualifiedName~${CLASS}."
dotnet build "$project" -v q -nologo >/dev/null
out=$(mktemp -d)
failed=0
for i in $(seq 1 "$N"); do
  start=$SECONDS
  if dotnet test "$project" --no-build --filter "$filter" >"$out/$i.log" 2>&1; then
    echo "run $i: passed in $((SECONDS - start)) s ($(grep -oE 'Passed: +[0-9]+' "$out/$i.log" | tail -1))"
  else
    failed=$((failed + 1))
    echo "run $i: FAILED in $((SECONDS - start)) s; log $out/$i.log"
    grep -E '^\s+Failed |Error Message:' -A3 "$out/$i.log" | head -20 | sed 's/^/    /'
  fi
done
echo "$name: $failed of $N runs failed"
[ "$failed" -eq 0 ]
