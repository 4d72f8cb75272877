//! Cost of placing a team: the slot hash and the shard lookup, on every request's path.

use convoy_store::{ShardMap, Slot};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn slot_hashing(c: &mut Criterion) {
    c.bench_function("slot_for_team/short", |b| {
        b.iter(|| Slot::for_team(black_box("acme")))
    });
    c.bench_function("slot_for_team/63_bytes", |b| {
        let team = "a".repeat(63);
        b.iter(|| Slot::for_team(black_box(&team)))
    });
    let map = ShardMap::evenly(&["postgres://a".into(), "postgres://b".into()]).unwrap();
    c.bench_function("owner_of_team", |b| {
        b.iter(|| map.owner_of_team(black_box("acme")))
    });
}

criterion_group!(benches, slot_hashing);
criterion_main!(benches);
