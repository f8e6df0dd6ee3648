//! The Redis tier against real `redis-server` processes (a single server and
//! a three-master cluster). Needs `redis-server` and `redis-cli`
//! (`scripts/redis.sh`); without them these tests fail, they never skip.

#[path = "common/redis_server.rs"]
mod redis_server;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::store::{Key, RedisOptions, RedisTier, StoreError, Tier};
use redis_server::{RedisCluster, RedisServer};

fn key(i: u32) -> Key {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[15] = 0x5a;
    k
}

/// Bytes derived from the key, so any value read back can be checked.
fn value_for(k: &Key, len: usize) -> Vec<u8> {
    let seed = xxhash_rust::xxh3::xxh3_64(k);
    (0..len)
        .map(|i| (seed.wrapping_mul(i as u64 + 1) >> 29) as u8)
        .collect()
}

fn opts(timeout_ms: u64) -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..RedisOptions::default()
    }
}

/// A plain connection of the `redis` crate, to tamper with entries.
fn raw(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn raw_get(con: &mut dyn redis::ConnectionLike, k: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(k).query(con).unwrap()
}

fn expect_io<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::Io(msg)) => msg,
        other => panic!("{what}: expected StoreError::Io, got {other:?}"),
    }
}

fn expect_corrupt<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::Corrupt(msg)) => msg,
        other => panic!("{what}: expected StoreError::Corrupt, got {other:?}"),
    }
}

#[test]
fn round_trip_overwrite_large_and_remove() {
    let server = RedisServer::start();
    let tier = RedisTier::open(&server.url(), RedisOptions::default()).unwrap();
    assert_eq!(tier.name(), "redis");
    let (a, b) = (key(1), key(2));

    assert_eq!(tier.get(&a).unwrap(), None);
    assert!(!tier.contains(&a).unwrap());
    tier.remove(&a).unwrap(); // absent: not an error

    tier.put(&a, b"hello").unwrap();
    assert!(tier.contains(&a).unwrap());
    assert_eq!(tier.get(&a).unwrap().as_deref(), Some(&b"hello"[..]));
    // Stored under the prefix and the hex key, framed: 24 bytes of overhead.
    let rkey = tier.redis_key(&a);
    assert_eq!(rkey, format!("cachegen:{}", cachegen::store::key_hex(&a)));
    assert_eq!(server.command(&["STRLEN", &rkey]).unwrap(), b"29");
    assert_eq!(server.command(&["TTL", &rkey]).unwrap(), b"-1");

    // Empty value.
    tier.put(&b, b"").unwrap();
    assert_eq!(tier.get(&b).unwrap(), Some(Vec::new()));

    // Overwrite, with a different length.
    let long = value_for(&a, 1000);
    tier.put(&a, &long).unwrap();
    assert_eq!(tier.get(&a).unwrap(), Some(long));

    // 8 MB.
    let big = value_for(&b, 8 << 20);
    tier.put(&b, &big).unwrap();
    assert_eq!(tier.get(&b).unwrap().as_deref(), Some(&big[..]));

    tier.remove(&a).unwrap();
    assert!(!tier.contains(&a).unwrap());
    assert_eq!(tier.get(&a).unwrap(), None);
    assert!(tier.contains(&b).unwrap());

    let s = tier.stats();
    assert_eq!((s.hits, s.misses, s.puts), (4, 2, 4), "{s:?}");
    assert_eq!((s.evictions, s.bytes, s.entries), (0, 0, 0), "{s:?}");

    // A second instance on the same server sees the same entries.
    let other = RedisTier::open(&server.url(), RedisOptions::default()).unwrap();
    assert_eq!(other.get(&b).unwrap().as_deref(), Some(&big[..]));
}

#[test]
fn prefix_ttl_database_and_password() {
    let server = RedisServer::start_with_args(&["--requirepass", "s3cret"]);
    let port = server.port();
    let url = format!("redis://:s3cret@127.0.0.1:{port}/3");
    let tier = RedisTier::open(
        &url,
        RedisOptions {
            key_prefix: "t:".into(),
            ttl: Some(Duration::from_secs(60)),
            ..opts(500)
        },
    )
    .unwrap();
    let k = key(7);
    tier.put(&k, b"in db 3").unwrap();
    assert_eq!(tier.get(&k).unwrap().as_deref(), Some(&b"in db 3"[..]));

    let rkey = format!("t:{}", cachegen::store::key_hex(&k));
    let mut db3 = raw(&url);
    assert!(raw_get(&mut db3, &rkey).is_some());
    let pttl: i64 = redis::cmd("PTTL").arg(&rkey).query(&mut db3).unwrap();
    assert!(pttl > 50_000 && pttl <= 60_000, "PTTL {pttl}");
    let mut db0 = raw(&format!("redis://:s3cret@127.0.0.1:{port}/0"));
    assert!(
        raw_get(&mut db0, &rkey).is_none(),
        "the entry must be in database 3 only"
    );

    // Wrong password: an I/O error that does not show the password.
    let bad = RedisTier::open(&format!("redis://:wrong-pw@127.0.0.1:{port}"), opts(500)).unwrap();
    let msg = expect_io(bad.get(&k), "get with a wrong password");
    assert!(!msg.contains("wrong-pw"), "{msg}");
    assert!(msg.contains("***@127.0.0.1"), "{msg}");
}

#[test]
fn corrupt_values_are_reported_then_gone() {
    let server = RedisServer::start();
    let tier = RedisTier::open(&server.url(), RedisOptions::default()).unwrap();
    let mut con = raw(&server.url());
    let value = value_for(&key(0), 4096);

    // 1. Truncated: the frame loses its last 100 bytes.
    let k = key(10);
    tier.put(&k, &value).unwrap();
    let rkey = tier.redis_key(&k);
    let frame = raw_get(&mut con, &rkey).unwrap();
    assert_eq!(frame.len(), value.len() + 24);
    assert_eq!(&frame[..8], b"CGREDIS1");
    let _: () = redis::cmd("SET")
        .arg(&rkey)
        .arg(&frame[..frame.len() - 100])
        .query(&mut con)
        .unwrap();
    let msg = expect_corrupt(tier.get(&k), "truncated");
    assert!(msg.contains("length"), "{msg}");
    assert_eq!(
        raw_get(&mut con, &rkey),
        None,
        "the corrupt entry is deleted"
    );
    assert_eq!(tier.get(&k).unwrap(), None);
    assert!(!tier.contains(&k).unwrap());

    // 2. One value byte altered in place (SETRANGE).
    let k = key(11);
    tier.put(&k, &value).unwrap();
    let rkey = tier.redis_key(&k);
    let flipped = [value[1000] ^ 0x01];
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&rkey)
        .arg(16 + 1000)
        .arg(&flipped[..])
        .query(&mut con)
        .unwrap();
    let msg = expect_corrupt(tier.get(&k), "altered");
    assert!(msg.contains("checksum"), "{msg}");
    assert_eq!(tier.get(&k).unwrap(), None);

    // 3. Not a frame at all (someone else's value under our key), and a
    //    frame shorter than its own header.
    for (i, junk) in [
        &b"plain text written by another program"[..],
        &b"CGREDIS1"[..],
    ]
    .iter()
    .enumerate()
    {
        let k = key(12 + i as u32);
        let rkey = tier.redis_key(&k);
        let _: () = redis::cmd("SET")
            .arg(&rkey)
            .arg(*junk)
            .query(&mut con)
            .unwrap();
        expect_corrupt(tier.get(&k), "junk");
        assert_eq!(tier.get(&k).unwrap(), None);
    }

    // 4. A user whose ACL refuses EVAL: the corrupt entry is still deleted
    //    (plain DEL). Also exercises AUTH with a user name.
    server
        .command(&[
            "ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-eval",
        ])
        .unwrap();
    let limited = RedisTier::open(
        &format!("redis://noscript:pw@127.0.0.1:{}", server.port()),
        RedisOptions::default(),
    )
    .unwrap();
    let mut as_noscript = raw(&format!("redis://noscript:pw@127.0.0.1:{}", server.port()));
    let refused: redis::RedisResult<i64> = redis::cmd("EVAL")
        .arg("return 1")
        .arg(0)
        .query(&mut as_noscript);
    assert!(refused.is_err(), "the ACL must refuse EVAL");
    let k = key(14);
    limited.put(&k, &value).unwrap();
    let rkey = limited.redis_key(&k);
    let _: i64 = redis::cmd("SETRANGE")
        .arg(&rkey)
        .arg(20)
        .arg("zz")
        .query(&mut con)
        .unwrap();
    expect_corrupt(limited.get(&k), "corrupt, no EVAL allowed");
    assert_eq!(raw_get(&mut con, &rkey), None);
    assert_eq!(limited.get(&k).unwrap(), None);

    // Untouched entries are unaffected, and a put after corruption works.
    tier.put(&key(10), b"fresh").unwrap();
    assert_eq!(tier.get(&key(10)).unwrap().as_deref(), Some(&b"fresh"[..]));
}

#[test]
fn server_down_fails_fast_then_reconnects_after_restart() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(300);
    let tier = RedisTier::open(&server.url(), opts(300)).unwrap();
    let k = key(20);
    // Several pooled connections, all of which go stale.
    std::thread::scope(|s| {
        for t in 0..4 {
            let tier = &tier;
            s.spawn(move || tier.put(&key(100 + t), b"x").unwrap());
        }
    });
    tier.put(&k, b"before").unwrap();

    server.stop();
    for round in 0..2 {
        type Op<'a> = Box<dyn Fn() -> Result<(), StoreError> + 'a>;
        let ops: [(&str, Op); 4] = [
            ("get", Box::new(|| tier.get(&k).map(drop))),
            ("put", Box::new(|| tier.put(&k, b"during"))),
            ("contains", Box::new(|| tier.contains(&k).map(drop))),
            ("remove", Box::new(|| tier.remove(&k))),
        ];
        for (what, op) in ops {
            let t0 = Instant::now();
            let msg = expect_io(op(), what);
            let elapsed = t0.elapsed();
            assert!(
                elapsed < 2 * timeout,
                "{what} (round {round}) took {elapsed:?}"
            );
            assert!(
                msg.contains(&format!("127.0.0.1:{}", server.port())),
                "{msg}"
            );
        }
    }

    // Same tier instance, server back (empty: no persistence).
    server.restart();
    assert_eq!(
        tier.get(&k).unwrap(),
        None,
        "the first operation after a restart works"
    );
    tier.put(&k, b"after").unwrap();
    assert_eq!(tier.get(&k).unwrap().as_deref(), Some(&b"after"[..]));
    assert!(tier.contains(&k).unwrap());

    // A restart between two operations: every pooled connection is stale,
    // yet the next operation succeeds (it reconnects and retries once).
    std::thread::scope(|s| {
        for t in 0..4 {
            let tier = &tier;
            s.spawn(move || tier.put(&key(100 + t), b"x").unwrap());
        }
    });
    server.restart();
    assert_eq!(
        tier.get(&k).unwrap(),
        None,
        "the first operation after a quick restart works"
    );
    tier.put(&k, b"again").unwrap();
    assert_eq!(tier.get(&k).unwrap().as_deref(), Some(&b"again"[..]));
}

#[test]
fn opened_while_server_is_down() {
    let mut server = RedisServer::start();
    server.stop();
    let t0 = Instant::now();
    let tier = RedisTier::open(&server.url(), opts(300)).unwrap();
    assert!(
        t0.elapsed() < Duration::from_millis(100),
        "open must not connect"
    );
    expect_io(tier.get(&key(1)), "get while down");
    expect_io(tier.put(&key(1), b"v"), "put while down");

    server.restart();
    tier.put(&key(1), b"v").unwrap();
    assert_eq!(tier.get(&key(1)).unwrap().as_deref(), Some(&b"v"[..]));
}

#[test]
fn hung_server_times_out() {
    // Accepts TCP connections (the kernel does, from the backlog) but never
    // answers: reads and, for a large value, writes must time out.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let timeout = Duration::from_millis(200);
    let tier = RedisTier::open(&format!("redis://127.0.0.1:{port}"), opts(200)).unwrap();
    let t0 = Instant::now();
    expect_io(tier.get(&key(1)), "get from a hung server");
    let e = t0.elapsed();
    assert!(e >= timeout / 2 && e < 2 * timeout, "get took {e:?}");

    // 8 MB is more than the socket buffers take without a reader, so the
    // write blocks and must time out. The timeout bounds each blocked write
    // call, and a call that moved some bytes before timing out returns them
    // and the next call waits again: while the kernel buffers still grow
    // (about 4 MB on loopback here, taken in 2 or 3 steps) a put can take a
    // few timeouts, never an unbounded time. `put` also frames the value
    // first (a copy and a hash, slow in a debug build): that local work is
    // allowed on top.
    let big = vec![7u8; 8 << 20];
    let t0 = Instant::now();
    let _ = std::hint::black_box(xxhash_rust::xxh3::xxh3_64(&big));
    drop(std::hint::black_box(big.clone()));
    let local = t0.elapsed();
    let t0 = Instant::now();
    expect_io(tier.put(&key(1), &big), "8 MB put to a hung server");
    let e = t0.elapsed();
    assert!(
        e >= timeout / 2 && e < 5 * timeout + 2 * local,
        "put took {e:?} (local work {local:?})"
    );
    drop(listener);
}

#[test]
fn urls_and_limits() {
    let o = RedisOptions::default;
    for (url, needle) in [
        ("rediss://127.0.0.1:6379", "TLS"),
        ("rediss+cluster://127.0.0.1:7000", "TLS"),
        ("http://127.0.0.1", "unknown scheme"),
        ("127.0.0.1:6379", "no scheme"),
        ("redis://127.0.0.1:6379/notanumber", "database"),
        (
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001/2",
            "database 0",
        ),
        (
            "redis+cluster://127.0.0.1:7000,,127.0.0.1:7001",
            "empty node",
        ),
        ("redis+cluster://127.0.0.1:7000?x=1", "query"),
        (
            "redis+cluster://127.0.0.1:notaport",
            "node 127.0.0.1:notaport",
        ),
    ] {
        let msg = expect_io(RedisTier::open(url, o()).map(drop), url);
        assert!(msg.contains(needle), "{url}: {msg}");
    }
    let zero = RedisOptions {
        timeout: Duration::ZERO,
        ..o()
    };
    expect_io(
        RedisTier::open("redis://127.0.0.1", zero).map(drop),
        "zero timeout",
    );
    let zero_ttl = RedisOptions {
        ttl: Some(Duration::ZERO),
        ..o()
    };
    expect_io(
        RedisTier::open("redis://127.0.0.1", zero_ttl).map(drop),
        "zero ttl",
    );
    // Valid forms open without connecting.
    for url in [
        "redis://localhost",
        "redis://user:pw@127.0.0.1:1/5",
        "redis+unix:///tmp/nowhere.sock",
        "redis+cluster://127.0.0.1:1",
        "redis+cluster://:pw@127.0.0.1:1, 127.0.0.1:2 ,[::1]:3/",
    ] {
        RedisTier::open(url, o()).unwrap_or_else(|e| panic!("{url}: {e}"));
    }

    // 512 MiB is Redis's limit on a string: checked before connecting
    // (nothing listens on port 1). The zeroed buffer is never touched.
    // Credentials never appear in errors.
    for url in [
        "redis://u:hunter2@127.0.0.1:1/0",
        "redis+unix:///tmp/nowhere.sock?pass=hunter2",
    ] {
        let tier = RedisTier::open(url, opts(200)).unwrap();
        let msg = expect_io(tier.get(&key(1)), url);
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    let tier = RedisTier::open("redis://127.0.0.1:1", o()).unwrap();
    let huge = vec![0u8; 512 << 20];
    match tier.put(&key(1), &huge) {
        Err(StoreError::TooLarge { size, budget }) => {
            assert_eq!((size, budget), ((512 << 20) + 24, 512 << 20));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn concurrent_puts_and_gets_on_one_tier() {
    let server = RedisServer::start();
    let tier = Arc::new(RedisTier::open(&server.url(), RedisOptions::default()).unwrap());
    let deadline = Instant::now() + Duration::from_secs(1);
    let checked = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..8u32)
        .map(|t| {
            let (tier, checked) = (tier.clone(), checked.clone());
            std::thread::spawn(move || {
                let mut i = 0u32;
                while Instant::now() < deadline {
                    // Each thread owns 32 keys; some are shared with the next
                    // thread's reads, which must see a whole valid value or none.
                    let own = key(t * 1000 + i % 32);
                    let len = 1 + (i as usize * 7919) % 50_000;
                    let v = value_for(&own, len);
                    tier.put(&own, &v).unwrap();
                    let got = tier.get(&own).unwrap().expect("just written");
                    assert_eq!(got.len(), len);
                    assert_eq!(got, value_for(&own, len));
                    let other = key(((t + 1) % 8) * 1000 + i % 32);
                    if let Some(got) = tier.get(&other).unwrap() {
                        assert_eq!(got, value_for(&other, got.len()), "a torn value");
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = checked.load(Ordering::Relaxed);
    assert!(n > 100, "only {n} iterations in 1 s");
    let s = tier.stats();
    assert_eq!(s.puts, n);
    assert!(s.hits >= n);
}

#[test]
fn cluster_spreads_keys_and_is_shared() {
    let cluster = RedisCluster::start(3);
    let url = cluster.url();
    assert!(url.starts_with("redis+cluster://127.0.0.1:"), "{url}");
    let a = RedisTier::open(&url, RedisOptions::default()).unwrap();
    let keys: Vec<Key> = (0..100).map(key).collect();
    for k in &keys {
        a.put(k, &value_for(k, 100 + k[0] as usize * 37)).unwrap();
    }
    for k in &keys {
        assert_eq!(
            a.get(k).unwrap(),
            Some(value_for(k, 100 + k[0] as usize * 37))
        );
        assert!(a.contains(k).unwrap());
    }
    // The keys landed on every master.
    let mut total = 0;
    let mut nodes_used = HashSet::new();
    for &p in cluster.ports() {
        let n: u64 = String::from_utf8(cluster.command(p, &["DBSIZE"]).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        if n > 0 {
            nodes_used.insert(p);
        }
        total += n;
    }
    assert_eq!(total, 100);
    assert_eq!(nodes_used.len(), 3, "keys on every master");

    // A second instance, given one seed only, shares the entries.
    let seed_only = format!("redis+cluster://127.0.0.1:{}", cluster.ports()[1]);
    let b = RedisTier::open(&seed_only, RedisOptions::default()).unwrap();
    for k in &keys {
        assert_eq!(
            b.get(k).unwrap(),
            Some(value_for(k, 100 + k[0] as usize * 37))
        );
    }
    b.remove(&keys[5]).unwrap();
    assert_eq!(a.get(&keys[5]).unwrap(), None);
    b.put(&keys[5], b"from b").unwrap();
    assert_eq!(a.get(&keys[5]).unwrap().as_deref(), Some(&b"from b"[..]));

    // Corruption is detected and removed through the cluster too.
    let nodes: Vec<String> = cluster
        .ports()
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let mut raw_cluster = redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_connection()
        .unwrap();
    let rkey = a.redis_key(&keys[9]);
    let _: () = redis::cmd("SET")
        .arg(&rkey)
        .arg("CGREDIS1 but cut")
        .query(&mut raw_cluster)
        .unwrap();
    expect_corrupt(b.get(&keys[9]), "corrupt in the cluster");
    assert_eq!(raw_get(&mut raw_cluster, &rkey), None);
    assert_eq!(a.get(&keys[9]).unwrap(), None);
}
