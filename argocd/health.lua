-- Argo CD health check for serving.modelservice.dev/ModelService (Lua 5.1, as Argo CD runs it).
-- Install it under the argocd-cm key resource.customizations.health.serving.modelservice.dev_ModelService
-- (docs/argocd.md). It reads the kstatus conditions the operator writes, keyed by type.
--
-- A model scaled to zero reports Healthy: idle is the normal state of a serverless model, and Suspended or
-- Progressing would keep the Argo CD application from ever showing healthy.
hs = {}

local function condition(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function text(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
local generation = obj.metadata and obj.metadata.generation

-- Until the operator has acted on the latest spec, any condition describes an older one.
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

local stalled = condition(status.conditions, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = text(stalled, "Stalled")
  return hs
end

local ready = condition(status.conditions, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = text(ready, "Ready")
  return hs
end

if ready ~= nil and ready.status == "False" and ready.reason == "ScaledToZero" then
  hs.status = "Healthy"
  hs.message = "Scaled to zero; wakes on the first request"
  return hs
end

-- spec.replicas: 0 set by a person: deliberately off, and no request will wake it.
if ready ~= nil and ready.status == "False" and ready.reason == "ScaledDown" then
  hs.status = "Suspended"
  hs.message = text(ready, "spec.replicas is 0")
  return hs
end

-- Activating, Reconciling, Progressing, AwaitingCapacity, Unknown: not broken, not there yet.
hs.status = "Progressing"
hs.message = text(ready, "Waiting for the Ready condition")
return hs
