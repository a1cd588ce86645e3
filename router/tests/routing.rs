//! Properties of routing: totality, balance, minimal movement, weights, ids.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use common::{five_shard_map, four_shard_map, random_users, user_from_bits, weights};
use proptest::prelude::*;
use router::{bucket_of, Bucket, Epoch, ShardId, ShardMap, ShardWeight, UserId, BUCKET_COUNT};

/// Building a map costs thousands of SipHashes; tests over the reference
/// cluster share one.
fn four() -> &'static ShardMap {
    static MAP: OnceLock<ShardMap> = OnceLock::new();
    MAP.get_or_init(four_shard_map)
}

fn five() -> &'static ShardMap {
    static MAP: OnceLock<ShardMap> = OnceLock::new();
    MAP.get_or_init(five_shard_map)
}

/// Users per spread/movement sample: enough that sampling noise (~0.3% of a
/// 25% share) is far below the ±10% tolerance.
const USERS_PER_SAMPLE: usize = 100_000;

/// Fair share tolerance for the spread test, as a fraction of the fair share.
const SPREAD_TOLERANCE_FRACTION: f64 = 0.10;

/// 2 to 5 distinct shard ids below 64, weights 1..=3.
fn arbitrary_cluster() -> impl Strategy<Value = Vec<ShardWeight>> {
    prop::collection::btree_map(0u16..64, 1u32..=3, 2..=5).prop_map(|m| {
        m.into_iter()
            .map(|(shard, weight)| ShardWeight {
                shard: ShardId(shard),
                weight,
            })
            .collect()
    })
}

fn build(shards: &[ShardWeight]) -> ShardMap {
    ShardMap::from_weights(Epoch(1), shards)
        .expect("invariant: arbitrary_cluster yields distinct ids and valid weights")
}

fn share_by_shard(map: &ShardMap, users: impl Iterator<Item = UserId>) -> BTreeMap<ShardId, f64> {
    let mut counts: BTreeMap<ShardId, usize> = BTreeMap::new();
    let mut total = 0usize;
    for user in users {
        *counts.entry(map.shard_of(&user)).or_insert(0) += 1;
        total += 1;
    }
    counts
        .into_iter()
        .map(|(shard, n)| (shard, n as f64 / total as f64))
        .collect()
}

proptest! {
    #[test]
    fn every_user_maps_to_exactly_one_of_the_maps_shards_every_time(bits in any::<u128>()) {
        let map = four();
        let user = user_from_bits(bits);
        let shard = map.shard_of(&user);
        prop_assert!(map.shards().contains(&shard));
        prop_assert_eq!(map.shard_of(&user), shard);
        // Exactly one owner: the user's bucket is in the table under that shard.
        prop_assert_eq!(map.table()[bucket_of(&user).index()], shard);
        prop_assert_eq!(map.shard_of_bucket(bucket_of(&user)), shard);
    }

    #[test]
    fn user_ids_round_trip_through_display(bits in any::<u128>()) {
        let user = user_from_bits(bits);
        prop_assert_eq!(user.to_string().parse::<UserId>(), Ok(user));
    }

    #[test]
    fn shard_ids_round_trip_through_display(n in any::<u16>()) {
        prop_assert_eq!(ShardId(n).to_string().parse::<ShardId>(), Ok(ShardId(n)));
    }

    #[test]
    fn buckets_round_trip_through_display(n in 0..BUCKET_COUNT) {
        prop_assert_eq!(Bucket(n).to_string().parse::<Bucket>(), Ok(Bucket(n)));
    }

    #[test]
    fn a_username_always_gives_the_same_user_id(name in ".{0,40}") {
        prop_assert_eq!(UserId::for_username(&name), UserId::for_username(&name));
    }

    #[test]
    fn different_usernames_give_different_user_ids(a in ".{0,40}", b in ".{0,40}") {
        prop_assume!(a != b);
        prop_assert_ne!(UserId::for_username(&a), UserId::for_username(&b));
    }
}

proptest! {
    // Each case builds one or two maps (~10k SipHashes each in debug).
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn users_of_any_cluster_map_to_exactly_one_of_its_shards(
        shards in arbitrary_cluster(),
        users in prop::collection::vec(any::<u128>(), 64),
    ) {
        let map = build(&shards);
        let listed: BTreeSet<ShardId> = shards.iter().map(|s| s.shard).collect();
        prop_assert!(map.shards().is_subset(&listed));
        prop_assert_eq!(
            map.bucket_counts().values().sum::<usize>(),
            usize::from(BUCKET_COUNT)
        );
        for bits in users {
            let user = user_from_bits(bits);
            let shard = map.shard_of(&user);
            prop_assert!(map.shards().contains(&shard));
            prop_assert_eq!(map.shard_of(&user), shard);
        }
    }

    #[test]
    fn the_order_shards_are_listed_in_does_not_change_the_map(
        shuffled in arbitrary_cluster().prop_flat_map(|s| (Just(s.clone()), Just(s).prop_shuffle())),
    ) {
        let (sorted, shuffled) = shuffled;
        prop_assert_eq!(build(&sorted), build(&shuffled));
    }

    #[test]
    fn adding_a_shard_to_any_cluster_moves_buckets_only_onto_the_new_shard(
        shards in arbitrary_cluster(),
        new_shard in 64u16..128,
        new_weight in 1u32..=3,
    ) {
        let before = build(&shards);
        let mut grown = shards.clone();
        grown.push(ShardWeight { shard: ShardId(new_shard), weight: new_weight });
        let after = build(&grown);
        for m in before.moves_to(&after) {
            prop_assert_eq!(m.to, ShardId(new_shard));
        }
    }

    #[test]
    fn removing_a_shard_moves_only_that_shards_buckets(
        shards in arbitrary_cluster(),
        pick in any::<prop::sample::Index>(),
    ) {
        let removed = shards[pick.index(shards.len())].shard;
        let before = build(&shards);
        let remaining: Vec<ShardWeight> =
            shards.iter().filter(|s| s.shard != removed).cloned().collect();
        let after = build(&remaining);
        let moves = before.moves_to(&after);
        for m in &moves {
            prop_assert_eq!(m.from, removed);
        }
        prop_assert_eq!(moves.len(), before.bucket_counts().get(&removed).copied().unwrap_or(0));
    }
}

proptest! {
    // Each case routes 100k users; a few seeds are plenty since the map, not
    // the sample, dominates the spread.
    #![proptest_config(ProptestConfig::with_cases(4))]

    #[test]
    fn four_equal_shards_each_get_a_fair_share_of_users(seed in any::<u64>()) {
        let shares = share_by_shard(four(), random_users(seed, USERS_PER_SAMPLE));
        prop_assert_eq!(shares.len(), 4);
        let fair = 0.25;
        for (shard, share) in shares {
            prop_assert!(
                (share - fair).abs() <= fair * SPREAD_TOLERANCE_FRACTION,
                "shard {} has {:.4} of users, fair is {}", shard, share, fair
            );
        }
    }

    #[test]
    fn adding_a_fifth_shard_moves_only_users_to_the_new_shard(seed in any::<u64>()) {
        let (before, after) = (four(), five());
        let mut moved = 0usize;
        for user in random_users(seed, USERS_PER_SAMPLE) {
            let (from, to) = (before.shard_of(&user), after.shard_of(&user));
            if from != to {
                prop_assert_eq!(to, ShardId(5), "user {} moved {} -> {}", user, from, to);
                moved += 1;
            }
        }
        let moved_fraction = moved as f64 / USERS_PER_SAMPLE as f64;
        prop_assert!(
            (0.15..=0.25).contains(&moved_fraction),
            "{:.4} of users moved", moved_fraction
        );
    }
}

#[test]
fn adding_a_fifth_shard_moves_only_buckets_to_the_new_shard() {
    let moves = four().moves_to(five());
    assert!(moves.iter().all(|m| m.to == ShardId(5)), "{moves:?}");
    assert!(moves.iter().all(|m| m.from != ShardId(5)));
    assert!(moves.windows(2).all(|w| w[0].bucket < w[1].bucket));
    assert_eq!(moves.len(), five().bucket_counts()[&ShardId(5)]);
    let moved_fraction = moves.len() as f64 / f64::from(BUCKET_COUNT);
    assert!(
        (0.15..=0.25).contains(&moved_fraction),
        "{moved_fraction:.4} of buckets moved"
    );
}

#[test]
fn four_equal_shards_each_own_a_fair_share_of_buckets() {
    let fair = f64::from(BUCKET_COUNT) / 4.0;
    for (shard, n) in four().bucket_counts() {
        let off = (n as f64 - fair).abs() / fair;
        assert!(
            off <= SPREAD_TOLERANCE_FRACTION,
            "shard {shard} owns {n} buckets"
        );
    }
}

#[test]
fn a_double_weight_shard_gets_about_twice_the_buckets() {
    for ids in [[1u16, 2, 3], [10, 11, 12], [3, 1, 2]] {
        let map =
            ShardMap::from_weights(Epoch(1), &weights(&[(ids[0], 1), (ids[1], 2), (ids[2], 1)]))
                .expect("valid weights");
        let counts = map.bucket_counts();
        let single = (counts[&ShardId(ids[0])] + counts[&ShardId(ids[2])]) as f64 / 2.0;
        let ratio = counts[&ShardId(ids[1])] as f64 / single;
        assert!((1.6..=2.4).contains(&ratio), "ids {ids:?}: {counts:?}");
    }
}

#[test]
fn sequential_usernames_spread_evenly_too() {
    // Real ids are UUIDv5 of usernames, which are often sequential or
    // similar; they must spread as well as random v4 ids.
    let users = (0..20_000).map(|i| UserId::for_username(&format!("user{i}")));
    for (shard, share) in share_by_shard(four(), users) {
        assert!(
            (share - 0.25).abs() <= 0.25 * SPREAD_TOLERANCE_FRACTION,
            "shard {shard}: {share}"
        );
    }
}
