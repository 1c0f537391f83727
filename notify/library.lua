#!lua name=notify_VERSION
-- The publish contract and the history read, as one Redis function library (notify/library.py
-- loads it; VERSION is a hash of this file, so versions of the gateway that run side by side
-- during a deploy each keep their own).
--
-- A student's names carry one hash tag, so in a cluster every key of a call sits in one
-- slot: callers group notifications by slot (by node, on a single Redis).
--
-- What a notification costs Redis shapes the hot path (docs/performance.md): a redis.call
-- costs several times what a cheap command itself does, and so does a table allocated or a
-- global looked up per notification. So per notification there are two calls (RPUSH, whose
-- reply numbers the event, and SPUBLISH); a call's notifications come grouped by student,
-- whose state lives in one table reused for each; everything a call reads (incarnations,
-- dedupe keys) comes from one MGET; what must be written back is written once per student
-- and hour, or when the history is trimmed (a dedupe key, once per notification); and the
-- globals the hot path uses are looked up once per call (a library's load-time environment
-- does not have them).

-- This node's replication id, and the predecessor's that a promoted replica remembers.
local function node_identity()
  local info = redis.call('INFO', 'replication')
  return {
    replid = string.match(info, 'master_replid:(%x+)'),
    replid2 = string.match(info, 'master_replid2:(%x+)'),
  }
end

-- A student's incarnation key holds, packed in 60 bytes (unpacked several times faster than
-- a text format is parsed in Lua):
-- - the replication id of the node that wrote it, and the epoch (8 characters);
-- - the floor, a sequence number the incarnation is known to have reached (its first
--   event's, then refreshed hourly and at each trim; the sequence itself is the base plus
--   the history's length);
-- - the hour the expiries were last refreshed;
-- - the base, the sequence number of the last event trimmed off the history (a list of
--   event bodies: the i-th, from 1, is event base + i).
-- Anything else there, or nothing, is no incarnation. `unpack` is struct.unpack: the hot
-- path looks globals up once per call.
local LAYOUT = '>c40c8I4I4I4'

local function parse(state, unpack)
  if state and #state == 60 then
    local owner, epoch, floor, hour, base = unpack(LAYOUT, state)
    return epoch, owner, floor, hour, base
  end
end

local function pack(replid, epoch, floor, hour, base)
  return struct.pack(LAYOUT, replid, epoch, floor, hour, base)
end

local function store(key, epoch, replid, floor, hour, base, ttl)
  redis.call('SET', key, pack(replid, epoch, floor, hour, base), 'EX', ttl)
end

-- Start a new incarnation, with an empty history. Even a student without events has a
-- position that names its incarnation (<epoch>-0).
local function renew(key, history, node, candidate, ttl)
  redis.call('DEL', history)
  store(key, candidate, node.replid, 0, 0, 0, ttl)
  return candidate
end

-- Which incarnation (epoch) of a student's history is current (notify/incarnation.py says
-- when one ends). Returns the epoch, its floor, the hour of its last refresh, its base, and
-- 0 if it goes on, 1 if there was none, 2 if it ended.
local function settle(key, history, state, node, candidate, durable, ttl, unpack)
  local epoch, owner, floor, hour, base = parse(state, unpack)
  if epoch then
    if owner == node.replid then
      return epoch, floor, hour, base, 0
    end
    if durable == '1' and owner ~= node.replid2 then
      redis.call('SET', key, pack(node.replid, epoch, floor, hour, base), 'KEEPTTL')
      return epoch, floor, hour, base, 0
    end
  end
  return renew(key, history, node, candidate, ttl), 0, 0, 0, epoch and 2 or 1
end

-- Write back what must outlive the call, once per student: the base after a trim, and on
-- the student's first call of the hour (or of its history) the floor and the expiries. The
-- history then lives at least history_ttl after its last event (it is given an hour more),
-- and the incarnation position_ttl after its last event or read.
local function flush(student, call)
  store(student.key, student.epoch, call.node.replid, student.seq,
        student.refresh and call.hour or student.hour, student.base, call.position_ttl)
  if student.refresh then
    redis.call('EXPIRE', student.history, call.history_ttl + 3600)
  end
end

-- The history was lost (expired, evicted, deleted) while the incarnation key lived on:
-- numbers up to the floor were handed out already. The incarnation ends, and the event just
-- appended becomes the first of the next. Returns its sequence number.
local function lost(student, body, call)
  student.epoch = renew(student.key, student.history, call.node, call.candidate,
                        call.position_ttl)
  student.floor, student.base, student.refresh = 0, 0, true
  return redis.call('RPUSH', student.history, body)
end

-- KEYS: a marker for this call, then per student its incarnation and history, and per
-- notification its dedupe key if it has one.
-- ARGV: candidate epoch, durable flag, history size, history ttl, position ttl, dedupe ttl,
-- marker ttl (0: no marker), then per notification: its student's channel ("" for the same
-- student as the notification before: a student's notifications come together, in order),
-- body (the frame after its id), and "1" if it has a dedupe key (else ""). Every argument
-- costs Redis an allocation or two: the common notification has three.
-- Returns, flat, per notification: id and "1" when published; the first publish's id and
-- "0" for a duplicate; Redis's error and "2" when it refused the notification. (Strings:
-- the retry marker keeps them joined, and Lua turns numbers into strings slowly.)
local function publish(keys, args)
  local call, pcall, format, type = redis.call, redis.pcall, string.format, type
  local struct_unpack = struct.unpack
  local marker, marker_ttl = keys[1], tonumber(args[7])
  if marker_ttl > 0 then
    -- The same call again: its reply was lost with the connection, and the client resent
    -- it. Answer what it answered the first time (Redis's errors are one line each).
    local done = call('GET', marker)
    if done then
      local replay = {}
      for line in string.gmatch(done, '[^\n]+') do
        replay[#replay + 1] = line
      end
      return replay
    end
  end
  local this = {
    node = node_identity(), hour = math.floor(tonumber(call('TIME')[1]) / 3600),
    candidate = args[1], durable = args[2], size = tonumber(args[3]),
    history_ttl = tonumber(args[4]), position_ttl = args[5],
  }
  local size, dedupe_ttl, count = this.size, args[6], (#args - 7) / 3
  local limit = 2 * size
  -- Where each student's keys start, and each notification's dedupe key. Every string the
  -- call reads (incarnations, dedupe keys) comes from one MGET, in the order the loop below
  -- meets them: a call from Lua costs Redis several times what one more key in a call does.
  local starts, dedupes, names, k = {}, {}, {}, 2
  for i = 1, count do
    local a = 3 * i + 5
    if args[a] ~= '' then
      starts[i], names[#names + 1] = k, keys[k]
      k = k + 2
    end
    if args[a + 2] ~= '' then
      dedupes[i], names[#names + 1], k = keys[k], keys[k], k + 1
    end
  end
  local read = call('MGET', unpack(names))
  -- The ids this call gave dedupe keys, which the MGET could not see.
  local results, student, channel, seen, taken, r = {}, nil, nil, {}, {}, 0
  for i = 1, count do
    local a, k = 3 * i + 5, starts[i]
    if k then
      if student and (student.refresh or student.trimmed) then
        flush(student, this)
      end
      student = student or {}
      r = r + 1
      local key, history, state = keys[k], keys[k + 1], read[r]
      if seen[key] then
        -- Listed before in this call: what the MGET read is stale by now.
        state = call('GET', key)
      end
      seen[key] = true
      local epoch, floor, hour, base, outcome = settle(key, history, state,
                                                       this.node, this.candidate,
                                                       this.durable, this.position_ttl,
                                                       struct_unpack)
      student.key, student.history, student.epoch, student.floor = key, history, epoch, floor
      student.seq, student.hour, student.base = floor, hour, base
      student.refresh, student.trimmed = outcome ~= 0 or hour ~= this.hour, false
      channel = args[a]
    end
    local body, dedupe, id, flag = args[a + 1], dedupes[i], nil, nil
    if dedupe then
      r = r + 1
      local prior = taken[dedupe] or read[r]
      if prior then
        id, flag = prior, '0'
      end
    end
    if not flag then
      local length = pcall('RPUSH', student.history, body)
      if type(length) == 'table' then
        id, flag = length.err, '2'
      else
        local seq = student.base + length
        if seq <= student.floor then
          seq = lost(student, body, this)
        elseif length == 1 then
          -- A new list: it needs its expiry, and the incarnation the floor saying it was used.
          student.refresh = true
        elseif length > limit then
          -- Trimmed to the size asked for once twice over it, not at every event: a
          -- history holds as much as a stream trimmed approximately did, for one trim (and
          -- write of the incarnation) per `size` events.
          call('LTRIM', student.history, -size, -1)
          student.base, student.trimmed = seq - size, true
        end
        student.seq = seq
        -- %d: Lua's own number-to-string conversion (%.14g) costs twice as much.
        id, flag = student.epoch .. format('-%d', seq), '1'
        call('SPUBLISH', channel, '{"type":"event","id":"' .. id .. '",' .. body)
        if dedupe then
          call('SET', dedupe, id, 'EX', dedupe_ttl)
          taken[dedupe] = id
        end
      end
    end
    results[2 * i - 1], results[2 * i] = id, flag
  end
  if student and (student.refresh or student.trimmed) then
    flush(student, this)
  end
  if marker_ttl > 0 then
    call('SET', marker, table.concat(results, '\n'), 'EX', marker_ttl)
  end
  return results
end

-- KEYS: incarnation, history. ARGV: candidate epoch, durable flag, position ttl, then the
-- client's position (epoch, seq) if it has one. Settles the incarnation (a read may start
-- the new one, so that the resync it answers hands out a position in it), then, only for a
-- position the history can continue, the events after it: {epoch, seq, outcome, first,
-- bodies}, where first is the sequence number of the first body (more than one past the
-- client's position if the events in between were trimmed).
local function read(keys, args)
  local key, history, candidate, ttl = keys[1], keys[2], args[1], args[3]
  local node = node_identity()
  local epoch, floor, _, base, outcome = settle(key, history,
                                                redis.call('GETEX', key, 'EX', ttl), node,
                                                candidate, args[2], ttl, struct.unpack)
  local seq = 0
  if outcome == 0 then
    seq = base + redis.call('LLEN', history)
    if seq < floor then
      -- The history was lost while the incarnation key lived on (see lost): as good as
      -- none.
      epoch, seq, outcome = renew(key, history, node, candidate, ttl), 0, 1
    end
  end
  local after = tonumber(args[5])
  if not after or outcome ~= 0 or args[4] ~= epoch or after >= seq then
    return {epoch, seq, outcome, seq + 1, {}}
  end
  local start = math.max(after - base, 0)
  return {epoch, seq, outcome, base + start + 1, redis.call('LRANGE', history, start, -1)}
end

-- KEYS: incarnation, history. ARGV: how many events. The student's last events, for
-- diagnosis, without touching the incarnation: {epoch, first, bodies} (first: the sequence
-- number of the first body), or an empty reply without an incarnation.
local function recent(keys, args)
  local epoch, _, _, _, base = parse(redis.call('GET', keys[1]), struct.unpack)
  if not epoch then
    return {}
  end
  local length = redis.call('LLEN', keys[2])
  local bodies = redis.call('LRANGE', keys[2], -tonumber(args[1]), -1)
  return {epoch, base + length - #bodies + 1, bodies}
end

redis.register_function('notify_publish_VERSION', publish)
redis.register_function('notify_read_VERSION', read)
redis.register_function{function_name = 'notify_recent_VERSION', callback = recent,
                        flags = {'no-writes'}}
