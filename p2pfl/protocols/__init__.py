"""Sans-IO learning protocols: gossip learning, server-free FL and FedAvg as pure state machines.

``machine.handle(event, now) -> list[Action]`` and ``machine.next_deadline()``; randomness from an
injected ``random.Random``; models are opaque handles validated, measured and aggregated through an
injected ``ModelOps`` (``p2pfl.ml.StateDictOps`` for torch state_dicts: it has the ``distance()``
and rule ``params`` that self-centred clipping with an adaptive radius needs). No I/O, no clock, no
torch: the daemon, the virtual-time engine and the unit tests drive the very same machines.

Robust by default: every protocol merges with clipping ("clip"): gossip around its own model,
server-free and FedAvg by centred clipping (3 steps) around the round's starting model; plain
"mean" only when configured. Ages, rounds and sample counts from peers are
bounded claims; what fails a bound is counted in ``machine.dropped``, never adopted.

Driving one (what the daemon and ``p2pfl.sim.virtual`` do)::

    machine = GossipLearner(node_id, weights, ops, random.Random(seed), GossipConfig(period=5.0))
    actions = [*machine.handle(PeerUp(peer), now) for each live peer]  # then:
    actions = machine.handle(Start(), now)
    # perform actions in order:
    #   Send(peer, m)   -> seal(identity, kind=m.KIND, body=m.to_body(encode_weights), ...)
    #   Train(w, b)     -> run the executor, then handle(TrainingDone(new_w, report), now)
    #   Evaluate(w)     -> handle(EvaluationDone(metrics), now)
    #   Adopt(w)        -> this is the node's model now (checkpoint, serve)
    #   SetTimer(at)    -> handle(TimerFired(), at) when the clock reaches it (None: cancel)
    #   Penalize(p, r)  -> drop/ban the peer;  UseFeatures -> hand readings to the task
    # a verified envelope from peer:
    #   handle(MessageReceived(peer, decode_message(env.kind, env.body, decode_weights)), now)
    #   (MessageError: count its .reason and drop the envelope)
"""

from ._actions import Action as Action
from ._actions import Adopt as Adopt
from ._actions import Evaluate as Evaluate
from ._actions import Log as Log
from ._actions import Metric as Metric
from ._actions import Penalize as Penalize
from ._actions import Send as Send
from ._actions import SetTimer as SetTimer
from ._actions import Train as Train
from ._actions import UseFeatures as UseFeatures
from ._base import OUTLIER_RULES as OUTLIER_RULES
from ._base import WEIGHTED_RULES as WEIGHTED_RULES
from ._base import Learner as Learner
from ._base import LearnerSettings as LearnerSettings
from ._base import SampleWeightedSettings as SampleWeightedSettings
from ._events import EvaluationDone as EvaluationDone
from ._events import Event as Event
from ._events import MessageReceived as MessageReceived
from ._events import PeerDown as PeerDown
from ._events import PeerUp as PeerUp
from ._events import Start as Start
from ._events import TimerFired as TimerFired
from ._events import TrainingDone as TrainingDone
from ._events import TrainingReport as TrainingReport
from ._fedavg import FedAvgConfig as FedAvgConfig
from ._fedavg import FedAvgLearner as FedAvgLearner
from ._gossip import GossipConfig as GossipConfig
from ._gossip import GossipLearner as GossipLearner
from ._messages import MESSAGE_KINDS as MESSAGE_KINDS
from ._messages import FeatureReply as FeatureReply
from ._messages import FeatureRequest as FeatureRequest
from ._messages import GlobalModel as GlobalModel
from ._messages import GossipModel as GossipModel
from ._messages import Message as Message
from ._messages import MessageError as MessageError
from ._messages import RoundUpdate as RoundUpdate
from ._messages import decode_message as decode_message
from ._ops import FeatureCheck as FeatureCheck
from ._ops import FeaturePlan as FeaturePlan
from ._ops import FeatureSource as FeatureSource
from ._ops import ModelOps as ModelOps
from ._ops import PeerSampler as PeerSampler
from ._ops import uniform_peer as uniform_peer
from ._sampling import SHUFFLE_KINDS as SHUFFLE_KINDS
from ._sampling import Connect as Connect
from ._sampling import Disconnect as Disconnect
from ._sampling import PeerSampling as PeerSampling
from ._sampling import SamplingAction as SamplingAction
from ._sampling import SamplingConfig as SamplingConfig
from ._sampling import SamplingSend as SamplingSend
from ._sampling import ShuffleReply as ShuffleReply
from ._sampling import ShuffleRequest as ShuffleRequest
from ._sampling import ViewChange as ViewChange
from ._sampling import decode_shuffle as decode_shuffle
from ._server_free import ServerFreeConfig as ServerFreeConfig
from ._server_free import ServerFreeLearner as ServerFreeLearner
