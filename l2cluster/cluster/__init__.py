"""The daemon on Ray: a coordinator actor that queues jobs and plans (`scheduler`, pure) which packs start on
which gangs of rank actors (`gang`); `daemon` starts, stops and reaches it. The only part of l2cluster that
imports Ray besides the entry points (`api`, `cli`).
"""
