#!/usr/bin/env bash
# The command line, end to end: what fxopt recognises in a model, why a pass did or did not apply, and an
# optimized, exported model with its report (Markdown + one HTML page with plots).
#
#   bash examples/05_command_line.sh [OUT]          (OUT defaults to fxopt-05)
set -euo pipefail
out=${1:-fxopt-05}

fxopt passes                                                  # every pass: exactness, requirements, options
fxopt analyze LlamaForCausalLM                                # blocks, heads and KV heads, MLP kind
fxopt explain LlamaForCausalLM --pass fuse_layernorm          # sites applied, near-misses with their source line
fxopt optimize LlamaForCausalLM --passes stabilize_softmax,fuse_layernorm,smoothquant --export onnx -o "$out"
fxopt report "$out"                                           # report.md (+ report_files/) and report.html
