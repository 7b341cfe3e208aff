//! The Lua scripts behind [`RedisStore`](super::RedisStore): one script per operation, so each is
//! atomic on the Redis server and reads the server's clock.

use std::sync::LazyLock;

use redis::Script;

use crate::limits::QuotaPeriod;
use crate::limits::memory::QUOTA_RETENTION_SECS;

/// Window arithmetic shared by the scripts; must match `window.rs` (tests check it does).
/// Lua 5.1 numbers are doubles: exact for every integer used here (< 2^53).
macro_rules! window_lua {
    () => {
        r#"
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- period: 1 hourly, 2 daily, 3 weekly (ISO, Monday), 4 monthly. Returns index, start, end (seconds).
local function period_bounds(p, s)
  if p == 1 then
    local i = math.floor(s / 3600)
    return i, i * 3600, i * 3600 + 3600
  elseif p == 2 then
    local i = math.floor(s / 86400)
    return i, i * 86400, i * 86400 + 86400
  elseif p == 3 then
    local w = math.floor((math.floor(s / 86400) + 3) / 7)
    local start = (w * 7 - 3) * 86400
    if start < 0 then start = 0 end
    return w, start, (w * 7 + 4) * 86400
  end
  local y, m = civil_from_days(math.floor(s / 86400))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return (y - 1970) * 12 + m - 1, days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

-- Exact integer to string (tostring would print 1e+15).
local function int(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#
    };
}

/// ARGV: prefix, tokens, n, then n times: key, tpm, rpm, quota, period (-1 / 0 when unset).
/// Replies `{0, minute, rem_t, rem_r, rem_q, period_1..period_n}` (admitted; -1 = none),
/// `{1, key_index, kind (1 tokens, 2 requests), retry_after_ms, rem_t, rem_r, rem_q}` or
/// `{2, key_index, resets_in_ms, rem_t, rem_r, rem_q}`.
const RESERVE_LUA: &str = concat!(
    window_lua!(),
    r#"
local prefix, tokens_arg = ARGV[1], ARGV[2]
local tokens, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local ms = now_ms()
local s = math.floor(ms / 1000)
local minute = math.floor(s / 60)
local rem_t, rem_r, rem_q = -1, -1, -1
local function lower(cur, v)
  if v < 0 then v = 0 end
  if cur < 0 or v < cur then return v end
  return cur
end
local checks = {}
local quota_fail, minute_fail = nil, nil
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local c = { key = ARGV[b + 1], tpm = tonumber(ARGV[b + 2]), rpm = tonumber(ARGV[b + 3]),
              quota = tonumber(ARGV[b + 4]), period = tonumber(ARGV[b + 5]), pidx = -1 }
  c.mkey = prefix .. ':v1:minute:' .. c.key .. ':' .. int(minute)
  local counts = redis.call('HMGET', c.mkey, 'tokens', 'requests')
  local used_t, used_r = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
  if c.tpm >= 0 then
    rem_t = lower(rem_t, c.tpm - used_t)
    if not minute_fail and used_t + tokens > c.tpm then minute_fail = { i, 1 } end
  end
  if c.rpm >= 0 then
    rem_r = lower(rem_r, c.rpm - used_r)
    if not minute_fail and used_r + 1 > c.rpm then minute_fail = { i, 2 } end
  end
  if c.period > 0 and c.quota >= 0 then
    local pidx, _, pend = period_bounds(c.period, s)
    c.pidx, c.pend = pidx, pend
    c.qkey = prefix .. ':v1:quota:' .. c.key .. ':' .. int(pidx)
    local used_q = tonumber(redis.call('GET', c.qkey)) or 0
    rem_q = lower(rem_q, c.quota - used_q)
    if not quota_fail and used_q + tokens > c.quota then quota_fail = { i, pend * 1000 - ms } end
  end
  checks[i] = c
end
if quota_fail then
  return { 2, quota_fail[1], quota_fail[2], rem_t, rem_r, rem_q }
end
if minute_fail then
  return { 1, minute_fail[1], minute_fail[2], (minute + 1) * 60000 - ms, rem_t, rem_r, rem_q }
end
local reply = { 0, minute, -1, -1, -1 }
if rem_t >= 0 then reply[3] = rem_t - tokens end
if rem_r >= 0 then reply[4] = rem_r - 1 end
if rem_q >= 0 then reply[5] = rem_q - tokens end
for i = 1, n do
  local c = checks[i]
  redis.call('HINCRBY', c.mkey, 'tokens', tokens_arg)
  redis.call('HINCRBY', c.mkey, 'requests', 1)
  redis.call('EXPIREAT', c.mkey, int((minute + 3) * 60))
  if c.qkey then
    redis.call('INCRBY', c.qkey, tokens_arg)
    redis.call('EXPIREAT', c.qkey, int(c.pend + 3600))
  end
  reply[5 + i] = c.pidx
end
return reply
"#
);

// The reserve script keeps quota counters for QUOTA_RETENTION_SECS after their period.
const _: () = assert!(QUOTA_RETENTION_SECS == 3_600);

/// ARGV: prefix, delta (signed), minute, n, then n times: key, period index ("" when none).
/// Adjusts only counters that still exist, never below 0, keeping their expiry.
const RECONCILE_LUA: &str = r#"
local prefix, delta, minute, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
for i = 1, n do
  local key, period = ARGV[4 + 2 * i - 1], ARGV[4 + 2 * i]
  local mkey = prefix .. ':v1:minute:' .. key .. ':' .. minute
  if redis.call('EXISTS', mkey) == 1 then
    if redis.call('HINCRBY', mkey, 'tokens', delta) < 0 then
      redis.call('HSET', mkey, 'tokens', 0)
    end
  end
  if period ~= '' then
    local qkey = prefix .. ':v1:quota:' .. key .. ':' .. period
    if redis.call('EXISTS', qkey) == 1 then
      if redis.call('INCRBY', qkey, delta) < 0 then
        redis.call('SET', qkey, 0, 'KEEPTTL')
      end
    end
  end
end
return 1
"#;

/// ARGV: prefix, key, period (0 when none). Replies `{tokens, requests, quota_used}`.
const USAGE_LUA: &str = concat!(
    window_lua!(),
    r#"
local prefix, key, period = ARGV[1], ARGV[2], tonumber(ARGV[3])
local s = math.floor(now_ms() / 1000)
local counts = redis.call('HMGET', prefix .. ':v1:minute:' .. key .. ':' .. int(math.floor(s / 60)),
  'tokens', 'requests')
local used_q = 0
if period > 0 then
  local pidx = period_bounds(period, s)
  used_q = tonumber(redis.call('GET', prefix .. ':v1:quota:' .. key .. ':' .. int(pidx))) or 0
end
return { tonumber(counts[1]) or 0, tonumber(counts[2]) or 0, used_q }
"#
);

pub(super) static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));
pub(super) static RECONCILE: LazyLock<Script> = LazyLock::new(|| Script::new(RECONCILE_LUA));
pub(super) static USAGE: LazyLock<Script> = LazyLock::new(|| Script::new(USAGE_LUA));

/// How the scripts name a quota period.
pub(super) fn period_code(period: QuotaPeriod) -> u8 {
    match period {
        QuotaPeriod::Hourly => 1,
        QuotaPeriod::Daily => 2,
        QuotaPeriod::Weekly => 3,
        QuotaPeriod::Monthly => 4,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use redis::Client;

    use super::*;

    /// The Lua window arithmetic, run by a real `redis-server`, agrees with `window.rs`.
    #[tokio::test]
    async fn lua_windows_match_window_rs() {
        let server = TestServer::start();
        let client = Client::open(format!("redis://127.0.0.1:{}/", server.port)).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let script = Script::new(concat!(
            window_lua!(),
            r#"
local out = {}
for i = 1, #ARGV, 2 do
  local idx, s, e = period_bounds(tonumber(ARGV[i]), tonumber(ARGV[i + 1]))
  table.insert(out, idx)
  table.insert(out, s)
  table.insert(out, e)
end
return out
"#
        ));
        // Every month start from 1970 to 2200, one second either side, then random instants.
        let mut instants = Vec::new();
        let mut t = 0;
        while t < 7_258_118_400 {
            let (_, _, end) = crate::limits::period_bounds(QuotaPeriod::Monthly, t);
            instants.extend([end - 1, end, end + 1]);
            t = end;
        }
        let mut rng = fastrand::Rng::with_seed(42);
        instants.extend((0..20_000).map(|_| rng.u64(0..7_258_118_400)));
        instants.extend([0, 1, 3 * 86_400 - 1, 4 * 86_400 - 1, 4 * 86_400]);

        let periods = [
            QuotaPeriod::Hourly,
            QuotaPeriod::Daily,
            QuotaPeriod::Weekly,
            QuotaPeriod::Monthly,
        ];
        let cases: Vec<(QuotaPeriod, u64)> = instants
            .iter()
            .flat_map(|&t| periods.map(|p| (p, t)))
            .collect();
        for batch in cases.chunks(2_000) {
            let mut invocation = script.prepare_invoke();
            for &(period, t) in batch {
                invocation.arg(period_code(period)).arg(t);
            }
            let reply: Vec<i64> = invocation.invoke_async(&mut conn).await.expect("eval");
            assert_eq!(reply.len(), batch.len() * 3);
            for (&(period, t), lua) in batch.iter().zip(reply.chunks(3)) {
                let (index, start, end) = crate::limits::period_bounds(period, t);
                let rust = [index, start as i64, end as i64];
                assert_eq!(lua, rust, "{period:?} at {t}");
            }
        }
    }

    /// A throwaway `redis-server` on a free port (the integration tests have the full harness).
    struct TestServer {
        port: u16,
        child: std::process::Child,
    }

    impl TestServer {
        fn start() -> Self {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is not installed; run ./scripts/test, which installs it");
            let server = Self { port, child };
            for _ in 0..500 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return server;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("redis-server did not listen on {port}");
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
