-- The gateway's edge checks, run by Envoy's Lua filter on every request before the transcoder.
-- devstack/gateway.py inlines this file into the Envoy configuration and fills in the marked
-- limits; docs/http-api.md ("Limits") lists them and what an over-limit request gets.
--
-- What it does, and why here rather than in the services:
--  * A JSON call reaches the services with the headers they read and nothing else (an allowlist):
--    a caller's grpc-timeout, grpc-encoding, te, *-bin or x-envoy-* header would otherwise reach
--    gRPC as transport metadata, and a bad one fails the call or logs an error in the service.
--    The gateway sets the call's deadline itself (grpc-timeout).
--  * Header values that gRPC metadata cannot carry (bytes outside printable ASCII) are refused,
--    as are over-long tokens, URLs whose percent-decoded bytes are not UTF-8 text, and methods
--    the API has no use for (CONNECT would otherwise hold the connection open as a tunnel).
--  * It runs on the request's headers, before the body is read: gateway_json.lua, after the body,
--    refuses a body that is not strict JSON.
-- A refusal sets the reason and gRPC code in the dynamic metadata namespace "gateway"; the
-- connection manager's local_reply_config renders them as google.rpc.Status JSON with an
-- ErrorInfo. A native gRPC call gets the same refusal as grpc-status and grpc-message.

local MAX_URL_BYTES = {{MAX_URL_BYTES}}
local UPSTREAM_GRPC_TIMEOUT = "{{UPSTREAM_GRPC_TIMEOUT}}"
-- The headers a JSON call keeps, each with its longest accepted value in bytes.
local FORWARDED = {
  ["authorization"] = {{MAX_AUTHORIZATION_BYTES}},
  ["x-request-id"] = {{MAX_REQUEST_ID_BYTES}},
  ["traceparent"] = {{MAX_TRACEPARENT_BYTES}},
  ["tracestate"] = {{MAX_TRACESTATE_BYTES}},
  ["content-type"] = 256,
  ["content-length"] = 20,
  -- Envoy sets it and routes by it.
  ["x-forwarded-proto"] = 16,
}
local INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNIMPLEMENTED, UNAUTHENTICATED = 3, 8, 12, 16
local METHODS = {GET = true, POST = true, PUT = true, PATCH = true, DELETE = true, OPTIONS = true, HEAD = true}

local function refuse(handle, grpc, http_status, grpc_code, reason, message)
  if grpc then
    handle:respond({
      [":status"] = "200",
      ["content-type"] = "application/grpc",
      ["grpc-status"] = tostring(grpc_code),
      ["grpc-message"] = message,
    }, "")
    return
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set("gateway", "reason", reason)
  metadata:set("gateway", "code", grpc_code)
  handle:respond({[":status"] = tostring(http_status)}, message)
end

-- Printable ASCII (space to tilde) and tab: what a gRPC metadata value may hold.
local function printable(value)
  return not value:find("[^\t\32-\126]")
end

-- Whether the bytes are UTF-8 text: no overlong forms, no surrogates, nothing past U+10FFFF, and
-- no control characters (NUL included), which no field of the API accepts.
local function utf8_text(bytes)
  if bytes:find("[%z\1-\31\127]") then
    return false
  end
  local index, length = 1, #bytes
  while index <= length do
    local lead = bytes:byte(index)
    local extra, point, minimum
    if lead < 0x80 then
      extra, point, minimum = 0, lead, 0
    elseif lead >= 0xC2 and lead <= 0xDF then
      extra, point, minimum = 1, lead - 0xC0, 0x80
    elseif lead >= 0xE0 and lead <= 0xEF then
      extra, point, minimum = 2, lead - 0xE0, 0x800
    elseif lead >= 0xF0 and lead <= 0xF4 then
      extra, point, minimum = 3, lead - 0xF0, 0x10000
    else
      return false
    end
    if index + extra > length then
      return false
    end
    for offset = 1, extra do
      local continuation = bytes:byte(index + offset)
      if continuation < 0x80 or continuation > 0xBF then
        return false
      end
      point = point * 64 + (continuation - 0x80)
    end
    if point < minimum or point > 0x10FFFF or (point >= 0xD800 and point <= 0xDFFF) then
      return false
    end
    index = index + extra + 1
  end
  return true
end

local function percent_decoded(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function check_forwarded(handle, grpc, headers)
  for name, limit in pairs(FORWARDED) do
    local value = headers:get(name)
    if value ~= nil and (#value > limit or not printable(value)) then
      if name == "authorization" then
        refuse(handle, grpc, 401, UNAUTHENTICATED, "TOKEN_INVALID", "the bearer token is not valid")
      else
        refuse(handle, grpc, 400, INVALID_ARGUMENT, "INVALID_HEADER",
          "the " .. name .. " header must be printable ASCII of at most " .. limit .. " bytes")
      end
      return false
    end
  end
  return true
end

-- Removes every header whose name `unwanted` says so (collected first: the map must not change
-- while it is walked).
local function remove_headers(headers, unwanted)
  local dropped = {}
  for name, _ in pairs(headers) do
    if unwanted(name) then
      dropped[#dropped + 1] = name
    end
  end
  for _, name in ipairs(dropped) do
    headers:remove(name)
  end
end

local function not_forwarded(name)
  return name:sub(1, 1) ~= ":" and FORWARDED[name] == nil
end

local function envoy_internal(name)
  return name:sub(1, 8) == "x-envoy-"
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  local grpc = content_type:sub(1, 16) == "application/grpc"
  if not METHODS[headers:get(":method") or ""] then
    refuse(handle, grpc, 405, UNIMPLEMENTED, "METHOD_NOT_ALLOWED",
      "the API answers GET, POST, PUT, PATCH and DELETE only")
    return
  end
  if not check_forwarded(handle, grpc, headers) then
    return
  end
  if grpc then
    -- A native gRPC caller's metadata is its own (its deadline included); only Envoy's internal
    -- headers are not the caller's to set.
    remove_headers(headers, envoy_internal)
    return
  end
  local path = headers:get(":path") or ""
  if #path > MAX_URL_BYTES then
    refuse(handle, grpc, 414, RESOURCE_EXHAUSTED, "URI_TOO_LONG",
      "the URL is longer than " .. MAX_URL_BYTES .. " bytes")
    return
  end
  if not utf8_text(percent_decoded(path)) then
    refuse(handle, grpc, 400, INVALID_ARGUMENT, "INVALID_URL_ENCODING",
      "the URL's path and query must be UTF-8 text once percent-decoded, without control characters")
    return
  end
  -- Everything but the pseudo-headers and FORWARDED goes; then the gateway's own deadline.
  remove_headers(headers, not_forwarded)
  headers:replace("grpc-timeout", UPSTREAM_GRPC_TIMEOUT)
end
