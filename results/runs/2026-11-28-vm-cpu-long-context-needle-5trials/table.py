"""The README's table, formatted from the records:
python3 table.py records.jsonl

Per entry and budget: trials at target, per-trial quality, mean paired drop
and exact match; medians over trials of the KV share, read share and
throughputs; 8k throughput over dense's of the same trial."""
import json, collections, statistics as st, sys
recs=[json.loads(l) for l in open(sys.argv[1])]
by=collections.defaultdict(dict)
for r in recs: by[(r['entry'], r['params'])][r['trial']]=r
dense={t:r for t,r in by[('dense','budget=1')].items()}
order=['dense','sink-window','block-topk','kv-cluster','dhsa','chunk-select','chunk-select-vote','chunk-select-evict']
print("| entry | budget | trials at target | quality_loss (per trial) | mean drop (per trial) | exact match | KV bytes / dense | share read | decode tok/s | at 8k | at 8k / dense | prefill s | time-to-result s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (e,p),tr in sorted(by.items(), key=lambda kv:(order.index(kv[0][0]), kv[0][1])):
    ts=sorted(tr)
    f=lambda k: [tr[t]['figures'][k] for t in ts]
    reached=sum(tr[t]['status']=='reached' for t in ts)
    q=' / '.join('%.4f'%tr[t]['quality'] for t in ts)
    dm=' / '.join('%.4f'%x for x in f('drop_mean'))
    acc=' / '.join('%d/%d'%(round(a*n), n) for a,n in zip(f('accuracy'), f('prompts')))
    r8=[tr[t]['figures']['tokens_per_s_c8192']/dense[t]['figures']['tokens_per_s_c8192'] for t in ts if t in dense]
    ttr=' / '.join(('%.0f'%tr[t]['time_to_result_s']) if tr[t]['status']=='reached' else 'miss' for t in ts)
    print(f"| {e} | {p.split('=')[1]} | {reached}/{len(ts)} | {q} | {dm} | {acc} | {st.median(f('kv_share')):.2f} | {st.median(f('read_share')):.2f} | {st.median(f('decode_tokens_per_s')):.1f} | {st.median(f('tokens_per_s_c8192')):.1f} | {' / '.join('%.2fx'%x for x in r8)} | {' / '.join('%.0f'%x for x in f('prefill_s'))} | {ttr} |")
