-- Argo CD health of a MedMOTraining (argocd-cm key resource.customizations.health.medmo.io_MedMOTraining).
-- Argo CD sets `obj` to the resource and reads `status` and `message` from the table returned.
--   Healthy      the run succeeded: every stage is done and the model exported
--   Progressing  waiting for the operator, queued in Kueue, initializing, running, or restarting a stage from its
--                checkpoint within runPolicy.backoffLimit (the operator recovers by itself, and a
--                Degraded app would stop a sync wave for what is only a retry)
--   Degraded     the run failed (non-retryable exit, backoff limit, deadline, model not accessible)
--   Suspended    runPolicy.suspend is true: pods stopped, checkpoints kept
local hs = {status = "Progressing", message = "waiting for the operator"}
local status = obj.status
if status == nil or status.phase == nil then
  return hs
end

local function condition(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind and c.status == "True" then
      return c
    end
  end
  return nil
end

local function held_back(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind and c.status == "False" then
      return c
    end
  end
  return nil
end

local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local phase = status.phase
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation
   and phase ~= "Succeeded" and phase ~= "Failed" then
  hs.message = "the operator has not yet acted on spec generation " .. generation
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = said(condition("Succeeded"), "every stage succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = said(condition("Failed"), "the run failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = said(condition("Suspended"), "the run is suspended")
elseif phase == "Restarting" then
  hs.message = said(condition("Restarting"), "a stage is restarting from its checkpoint")
elseif phase == "Running" or phase == "Pending" then
  local waiting = condition("WaitingForResources")
  local queued = held_back("Admitted")
  if queued ~= nil then
    hs.message = "queued: " .. said(queued, "waiting for Kueue to admit the stage")
  elseif waiting ~= nil then
    hs.message = "waiting for resources: " .. said(waiting, "pods are unschedulable")
  else
    local stage = status.currentStage
    local text = said(condition("Running"), "the run is " .. string.lower(phase))
    if stage ~= nil then
      for _, record in ipairs(status.stages or {}) do
        if record.name == stage and record.totalSteps ~= nil then
          text = string.format("stage %s: step %d of %d", stage, record.step or 0, record.totalSteps)
        end
      end
    end
    hs.message = text
  end
else
  hs.status = "Unknown"
  hs.message = "unknown phase " .. tostring(phase)
end
return hs
