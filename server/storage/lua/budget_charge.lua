-- budget_charge.lua: functions, not a script. Prepended to budgets.lua, append.lua and finish_reply.lua when they load.
--
-- charge_budgets(counters, noticed, limits, amount, ttl) charges token budgets (policy in server/chat/budgets.py) in
-- one step: when a counter would pass its limit nothing is charged and (index, global used, first) says which (first
-- = 1 the first time today that counter refused, so it is logged once across processes); else every counter whose
-- limit is >= 0 is charged `amount` (a negative amount gives tokens back, never below 0).
--
-- arg            meaning
-- counters       the day's counter keys: global first, then the visitor's and the client address's
-- noticed        beside each counter its "noticed" marker key (only read when a counter refuses)
-- limits         each counter's limit (0: counted, no limit; -1: not this call's)
-- amount         tokens to reserve (negative: give back)
-- ttl            the counters' TTL (s)
-- Returns 0, global used after the charge, 0 when charged; index (1-based), global used, first when refused.
local function charge_budgets(counters, noticed, limits, amount, ttl)
  local n = #counters
  local used = {}
  for i = 1, n do used[i] = tonumber(redis.call('GET', counters[i]) or '0') end
  for i = 1, n do
    if limits[i] > 0 and used[i] + amount > limits[i] then
      local first = redis.call('SET', noticed[i], '1', 'NX', 'EX', ttl) and 1 or 0
      return i, used[1], first
    end
  end
  for i = 1, n do
    if limits[i] >= 0 and amount ~= 0 then
      local now = redis.call('INCRBY', counters[i], amount)
      if now < 0 then redis.call('SET', counters[i], 0) end
      redis.call('EXPIRE', counters[i], ttl)
    end
  end
  return 0, used[1] + amount, 0
end

-- prompt_tokens(context, fixed, cap, truncated) is what server/chat/budgets.py fit_prompt counts for a prompt whose
-- history is `context` (message JSON, oldest first): visitors' messages and the non-empty assistant and agent
-- messages are turns, each UTF-8 bytes / 3 rounded up plus 4; the oldest turns are dropped until the prompt fits
-- `cap` and the history starts with a visitor's turn; when even the system prompt and the message alone pass the
-- cap, the message is cut and the count is `truncated` (computed by the caller). `fixed` counts the system prompt
-- and the message. A cap of 0 or less means no cap.
local function prompt_tokens(context, fixed, cap, truncated)
  local users, costs = {}, {}
  local total = fixed
  for _, raw in ipairs(context) do
    local ok, message = pcall(cjson.decode, raw)
    if ok and type(message) == 'table' then
      local content = message.content
      local role = message.role
      local text = nil
      if role == 'user' then
        text = type(content) == 'string' and content or ''
      elseif (role == 'assistant' or role == 'agent') and type(content) == 'string' and content ~= '' then
        text = content
      end
      if text then
        local cost = math.floor((#text + 2) / 3) + 4
        users[#users + 1] = role == 'user'
        costs[#costs + 1] = cost
        total = total + cost
      end
    end
  end
  if cap <= 0 or total <= cap then return total end
  local drop = 1
  while drop <= #costs and (total > cap or not users[drop]) do
    total = total - costs[drop]
    drop = drop + 1
  end
  if total > cap then total = truncated end
  return total
end
