"""The reviewed list of TensorFlow ops a SavedModel may contain (allowlist, not denylist).

A SavedModel's graph runs when it is loaded (initializers, restore functions) and when it is
served, so every op of every meta graph and of every library function is checked against
``ALLOWED_OPS`` before anything is loaded (see :mod:`fineprune_tf.io.graph_check`).  An op is
accepted only when a model's forward / backward pass or the standard variable restore needs
it.  Everything else is refused; :func:`refusal_reason` says why for the ops registered in
TensorFlow 2.21 (the families below, then ``NOT_NEEDED``).  ``tests/security/test_op_allowlist.py``
enumerates every registered op and fails when one is neither allowed nor explicitly refused,
so a TensorFlow upgrade forces a decision for each new op.
"""

from __future__ import annotations

import re

__all__ = [
    "ALLOWED_OPS",
    "CHECKPOINT_OPS",
    "FUNCTION_CALLING_OPS",
    "KERAS_CODE_CARRYING",
    "KERAS_CODE_CARRYING_LAYERS",
    "NOT_NEEDED",
    "explicitly_refused",
    "PRINT_OPS",
    "refusal_reason",
]

# fmt: off
# The tables below are reviewed lists of names in commented groups, wrapped by hand; one name
# per line would triple the file without making a review easier.

# Keras layers that run the model author's Python code or load another artefact (used by the
# .keras checks and by fineprune_tf.conversion).
KERAS_CODE_CARRYING = {
    "Lambda": "Lambda layer: runs Python code from the file",
    "__lambda__": "serialized Python bytecode",
    "TFSMLayer": "loads and runs an external SavedModel",
}
KERAS_CODE_CARRYING_LAYERS = ("Lambda", "TFSMLayer")

# Control flow that calls functions of the file's own library by attribute; the called
# functions are inspected like every other function (no other op may carry a function).
FUNCTION_CALLING_OPS = frozenset({
    "If", "StatelessIf", "While", "StatelessWhile", "Case", "StatelessCase",
    "PartitionedCall", "StatefulPartitionedCall"})

# Checkpoint I/O: only in the standard saver sub-graph, and only with a file name derived from
# the saver's file-name argument (the loader passes the SavedModel's own variables path).
CHECKPOINT_OPS = frozenset({"RestoreV2", "SaveV2", "MergeV2Checkpoints"})

# Printing: accepted only to the process's standard streams / log (attribute checked).
PRINT_OPS = frozenset({"PrintV2", "StringFormat"})

_GROUPS: dict[str, tuple[str, ...]] = {
    # Graph plumbing: constants, placeholders, identities, gradient stops, shape assertions.
    "plumbing": (
        "Const", "Identity", "IdentityN", "NoOp", "Placeholder", "PlaceholderV2",
        "PlaceholderWithDefault", "StopGradient", "PreventGradient", "EnsureShape", "Snapshot",
        "CheckNumerics", "CheckNumericsV2", "Assert", "ZerosLike", "OnesLike", "Fill"),
    # TF1-style dataflow control flow (the bodies are bounded by the child's time limit).
    "dataflow control flow": (
        "Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond", "ControlTrigger"),
    # Resource and reference variables: create, read, assign, gather/scatter, optimizer updates.
    "variables": (
        "VarHandleOp", "ReadVariableOp", "AssignVariableOp", "AssignAddVariableOp",
        "AssignSubVariableOp", "VarIsInitializedOp", "DestroyResourceOp", "DisableCopyOnRead",
        "VariableShape", "ResourceGather", "ResourceGatherNd", "ResourceScatterAdd",
        "ResourceScatterSub", "ResourceScatterMul", "ResourceScatterDiv", "ResourceScatterMin",
        "ResourceScatterMax", "ResourceScatterUpdate", "ResourceScatterNdAdd",
        "ResourceScatterNdSub", "ResourceScatterNdUpdate", "ResourceScatterNdMin",
        "ResourceScatterNdMax", "ResourceStridedSliceAssign", "VariableV2", "Variable",
        "Assign", "AssignAdd", "AssignSub", "IsVariableInitialized", "ResourceApplyAdam",
        "ResourceApplyAdamWithAmsgrad", "ResourceApplyGradientDescent",
        "ResourceApplyKerasMomentum", "ResourceApplyMomentum", "ResourceApplyRMSProp",
        "ResourceApplyAdagradV2", "ResourceApplyAdaMax", "ResourceApplyAdadelta"),
    # Lists and arrays of tensors (while-loop accumulators, RNNs and their gradients).
    "tensor lists": (
        "EmptyTensorList", "TensorListReserve", "TensorListSetItem", "TensorListGetItem",
        "TensorListStack", "TensorListFromTensor", "TensorListElementShape",
        "TensorListLength", "TensorListPushBack", "TensorListPopBack", "TensorListGather",
        "TensorListScatterIntoExistingList", "TensorListConcatV2", "TensorListResize",
        "TensorArrayV3", "TensorArrayReadV3", "TensorArrayWriteV3", "TensorArrayGatherV3",
        "TensorArrayScatterV3", "TensorArraySizeV3", "TensorArrayCloseV3",
        "TensorArrayGradV3", "TensorArrayConcatV3", "TensorArraySplitV3"),
    # Pure string helpers of the saver (file-name formatting only, no I/O).
    "saver strings": ("StringJoin", "StaticRegexFullMatch", "ShardedFilename",
                      "ShardedFilespec"),
    # Element-wise arithmetic, comparisons, logic, casts and their gradients.
    "element-wise math": (
        "Abs", "Acos", "Acosh", "Add", "AddN", "AddV2", "Asin", "Asinh", "Atan", "Atan2",
        "Atanh", "Ceil", "Cos", "Cosh", "Div", "DivNoNan", "Equal", "Erf", "Erfc", "Erfinv",
        "Exp", "Expm1", "Floor", "FloorDiv", "FloorMod", "Greater", "GreaterEqual", "Inv",
        "IsFinite", "IsInf", "IsNan", "Less", "LessEqual", "Lgamma", "Digamma", "Log", "Log1p",
        "LogicalAnd", "LogicalNot", "LogicalOr", "Maximum", "Minimum", "Mod", "Mul", "MulNoNan",
        "Neg", "NotEqual", "Pow", "RealDiv", "Reciprocal", "Rint", "Round", "Rsqrt", "Select",
        "SelectV2", "Sigmoid", "Sign", "Sin", "Sinh", "Sqrt", "Square", "SquaredDifference",
        "Sub", "Tan", "Tanh", "TruncateDiv", "TruncateMod", "ClipByValue", "Ndtri",
        "ApproximateEqual", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Invert", "LeftShift",
        "RightShift", "Cast", "Bitcast", "Xlogy", "Xdivy", "Xlog1py", "SigmoidGrad",
        "TanhGrad", "RsqrtGrad", "SqrtGrad", "ReciprocalGrad", "InvGrad", "Complex", "Real",
        "Imag", "Angle", "ComplexAbs", "Conj"),
    # Reductions and linear algebra.
    "reductions, linear algebra": (
        "Sum", "Mean", "Max", "Min", "Prod", "All", "Any", "ArgMax", "ArgMin", "MatMul",
        "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3", "Einsum", "Cumsum", "Cumprod",
        "CumulativeLogsumexp", "EuclideanNorm", "TopKV2", "InTopKV2", "L2Loss",
        "MatrixBandPart", "MatrixDiagV3", "MatrixDiagPartV3", "MatrixSetDiagV3", "Cholesky",
        "MatrixInverse", "MatrixTriangularSolve", "MatrixSolve", "MatrixDeterminant",
        "LogMatrixDeterminant", "Qr", "Svd", "SelfAdjointEigV2", "UnsortedSegmentSum",
        "UnsortedSegmentMax", "UnsortedSegmentMin", "UnsortedSegmentProd", "SegmentSum"),
    # Neural-network layers and their gradients (incl. this project's masked-activation op).
    "nn": (
        "BiasAdd", "BiasAddGrad", "BiasAddV1", "Conv", "Conv2D", "Conv2DBackpropInput",
        "Conv2DBackpropFilter", "Conv2DBackpropInputV2", "Conv2DBackpropFilterV2", "Conv3D",
        "Conv3DBackpropInputV2", "Conv3DBackpropFilterV2", "DepthwiseConv2dNative",
        "DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter",
        "MaxPool", "MaxPoolV2", "MaxPoolGrad", "MaxPoolGradV2", "MaxPoolGradGrad",
        "MaxPoolGradGradV2", "MaxPool3D", "MaxPool3DGrad", "AvgPool", "AvgPoolGrad",
        "AvgPool3D", "AvgPool3DGrad", "Relu", "ReluGrad", "Relu6", "Relu6Grad", "Elu",
        "EluGrad", "Selu", "SeluGrad", "LeakyRelu", "LeakyReluGrad", "Softplus",
        "SoftplusGrad", "Softsign", "SoftsignGrad", "Softmax", "LogSoftmax",
        "SoftmaxCrossEntropyWithLogits", "SparseSoftmaxCrossEntropyWithLogits",
        "FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3", "FusedBatchNormGrad",
        "FusedBatchNormGradV2", "FusedBatchNormGradV3", "LRN", "LRNGrad", "ResizeBilinear",
        "ResizeBilinearGrad", "ResizeNearestNeighbor", "ResizeNearestNeighborGrad",
        "ResizeBicubic", "ResizeBicubicGrad", "ResizeArea", "DepthToSpace", "SpaceToDepth",
        "SpaceToBatchND", "BatchToSpaceND", "ExtractImagePatches", "MirrorPad",
        "MirrorPadGrad", "DataFormatDimMap", "DataFormatVecPermute",
        "FinepruneMaskedActivation", "FinepruneMaskedActivationGrad"),
    # Shapes, slicing, concatenation, gathering and other array manipulation.
    "arrays and shapes": (
        "Shape", "ShapeN", "Size", "Rank", "Reshape", "ExpandDims", "Squeeze", "Transpose",
        "ConjugateTranspose", "Pack", "Unpack", "Concat", "ConcatV2", "ConcatOffset", "Split",
        "SplitV", "Slice", "StridedSlice", "StridedSliceGrad", "TensorStridedSliceUpdate",
        "Tile", "TileGrad", "Pad", "PadV2", "Range", "LinSpace", "Gather", "GatherV2",
        "GatherNd", "ScatterNd", "TensorScatterUpdate", "TensorScatterAdd", "TensorScatterSub",
        "TensorScatterMax", "TensorScatterMin", "Where", "OneHot", "ReverseV2", "Roll",
        "BroadcastTo", "BroadcastArgs", "BroadcastGradientArgs", "InvertPermutation",
        "Unique", "UniqueV2", "UniqueWithCounts", "DynamicStitch", "ParallelDynamicStitch",
        "DynamicPartition", "ReverseSequence", "Diag", "DiagPart", "UpperBound", "LowerBound",
        "Bucketize", "UnravelIndex", "Cross", "ListDiff"),
    # Random numbers (the only state they touch is their own seed / RNG variable).
    "random": (
        "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal",
        "Multinomial", "RandomShuffle", "RandomGamma", "RandomPoissonV2",
        "StatelessRandomUniform", "StatelessRandomUniformInt", "StatelessRandomNormal",
        "StatelessTruncatedNormal", "StatelessRandomUniformV2", "StatelessRandomUniformIntV2",
        "StatelessRandomUniformFullIntV2", "StatelessRandomNormalV2",
        "StatelessTruncatedNormalV2", "StatelessRandomGetKeyCounter", "StatelessRandomGetAlg",
        "StatelessRandomGetKeyCounterAlg", "StatelessMultinomial", "StatelessShuffle",
        "StatelessRandomBinomial", "StatelessRandomGammaV3", "RngReadAndSkip", "RngSkip",
        "StatefulUniform", "StatefulUniformInt", "StatefulUniformFullInt",
        "StatefulStandardNormalV2", "StatefulTruncatedNormal"),
}

ALLOWED_OPS: frozenset[str] = frozenset(
    name for group in _GROUPS.values() for name in group) | FUNCTION_CALLING_OPS \
    | CHECKPOINT_OPS | PRINT_OPS

# Refused families, checked in order; the first match gives the reason.
_REFUSED_FAMILIES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), reason) for pattern, reason in (
        (r"^(Abort|Sleep.*|SleepIdentityOp|GetDeadline|WorkerHeartbeat|SyncDevice)$",
         "ends or stalls the process"),
        (r"File|Reader|^(ReadFile|WriteFile|MatchingFiles|ImmutableConst|RecordInput|"
         r"LoadAndRemapMatrix|GenerateVocabRemapping|DumpTensor)$|^(Save|Restore)",
         "touches the file system"),
        (r"CandidateSampler|^(Skipgram|NegTrain)$", "samples from files / vocabularies"),
        (r"PyFunc", "calls back into Python code"),
        (r"Rpc|^RemoteCall$|DataService|RegisterDataset|^_?(Send|Recv|HostSend|HostRecv)$",
         "network / remote execution"),
        (r"Dataset|Iterator|^(DatasetFromGraph|DatasetToGraph.*|OptionalFromValue|"
         r"OptionalGetValue|OptionalHasValue|OptionalNone|CompressElement|"
         r"UncompressElement|ThreadPoolHandle|ExperimentalThreadPoolHandle|"
         r"DummyIterationCounter|DummyMemoryCache|DummySeedGenerator|MapDefun)$",
         "tf.data pipeline op (carries functions / graphs, reads files)"),
        (r"Summary|^Debug|StatsAggregator|^(ImportEvent|CalibrationStatisticsSaver|"
         r"Print|Timestamp|CustomAggregator)$", "debugging / summary / event output"),
        (r"TPU|Tpu|^_?Xla|DTensor|Infeed|Outfeed|Embedding|SparseCore|Risc|Mesh|"
         r"^Relayout|Dedup|Minibatch|^_?Collective|Nccl|^AllToAll$|CrossReplicaSum|"
         r"^(Relayout|RelayoutLike|CopyHost|Copy|CopyOp|KernelLabel.*|_.*)$",
         "device-specific, collective or internal op"),
        (r"Queue|^(Stage|Unstage|MapStage|MapUnstage.*|MapPeek|MapSize|MapClear|"
         r"MapIncompleteSize|OrderedMap.*|StagePeek|StageSize|StageClear|Barrier.*|"
         r"MutexLock|MutexV2|ConsumeMutexLock|.*Accumulator.*|Stack.*|Batch|Unbatch|"
         r"UnbatchGrad)$", "blocking queues / barriers / mutexes (may stall forever)"),
        (r"Table|^(InitializeTable.*|LookupTable.*)$", "lookup tables (initialized from files)"),
        (r"Session", "session handles"),
        (r"^(SymbolicGradient|For|BatchFunction|_If|_While|FuncAttr|FuncListAttr)$",
         "carries a function outside the reviewed control flow"),
    ))


# Reviewed and refused: registered in TensorFlow 2.21 but not needed by a model's forward /
# backward pass or the variable restore -- image / audio / proto encoding and decoding, sparse,
# ragged and quantized kernels, string processing, legacy (V1) duplicates of allowed ops,
# reference-variable scatter, boosted trees, CTC, FFT, special functions, TF's own test ops.
NOT_NEEDED: frozenset[str] = frozenset({
    "A", "AccumulateNV2", "AddManySparseToTensorsMap", "AddSparseToTensorsMap",
    "AdjustContrast", "AdjustContrastv2", "AdjustHue", "AdjustSaturation",
    "AnonymousMemoryCache", "AnonymousRandomSeedGenerator", "AnonymousSeedGenerator",
    "ApplyAdaMax", "ApplyAdadelta", "ApplyAdagrad", "ApplyAdagradDA", "ApplyAdagradV2",
    "ApplyAdam", "ApplyAddSign", "ApplyCenteredRMSProp", "ApplyFtrl", "ApplyFtrlV2",
    "ApplyGradientDescent", "ApplyMomentum", "ApplyPowerSign", "ApplyProximalAdagrad",
    "ApplyProximalGradientDescent", "ApplyRMSProp", "ApproxTopK", "AsString",
    "AssignVariableXlaConcatND", "Attr", "AttrBool", "AttrBoolList", "AttrDefault",
    "AttrEmptyListDefault", "AttrEnum", "AttrEnumList", "AttrFloat", "AttrListDefault",
    "AttrListMin", "AttrListTypeDefault", "AttrMin", "AttrPartialShape",
    "AttrPartialShapeList", "AttrShape", "AttrShapeList", "AttrTypeDefault",
    "AudioMicrofrontend", "AudioSpectrogram", "B", "BandedTriangularSolve", "BatchCholesky",
    "BatchCholeskyGrad", "BatchFFT", "BatchFFT2D", "BatchFFT3D", "BatchIFFT", "BatchIFFT2D",
    "BatchIFFT3D", "BatchMatrixBandPart", "BatchMatrixDeterminant", "BatchMatrixDiag",
    "BatchMatrixDiagPart", "BatchMatrixInverse", "BatchMatrixSetDiag", "BatchMatrixSolve",
    "BatchMatrixSolveLs", "BatchMatrixTriangularSolve", "BatchNormWithGlobalNormalization",
    "BatchNormWithGlobalNormalizationGrad", "BatchSelfAdjointEig", "BatchSelfAdjointEigV2",
    "BatchSvd", "BatchToSpace", "BesselI0", "BesselI0e", "BesselI1", "BesselI1e", "BesselJ0",
    "BesselJ1", "BesselK0", "BesselK0e", "BesselK1", "BesselK1e", "BesselY0", "BesselY1",
    "Betainc", "Binary", "Bincount", "BlockLSTM", "BlockLSTMGrad", "BlockLSTMGradV2",
    "BlockLSTMV2", "BoostedTreesAggregateStats", "BoostedTreesBucketize",
    "BoostedTreesCalculateBestFeatureSplit", "BoostedTreesCalculateBestFeatureSplitV2",
    "BoostedTreesCalculateBestGainsPerFeature", "BoostedTreesCenterBias",
    "BoostedTreesCreateEnsemble", "BoostedTreesCreateQuantileStreamResource",
    "BoostedTreesDeserializeEnsemble", "BoostedTreesEnsembleResourceHandleOp",
    "BoostedTreesExampleDebugOutputs", "BoostedTreesFlushQuantileSummaries",
    "BoostedTreesGetEnsembleStates", "BoostedTreesMakeQuantileSummaries",
    "BoostedTreesPredict", "BoostedTreesQuantileStreamResourceAddSummaries",
    "BoostedTreesQuantileStreamResourceDeserialize", "BoostedTreesQuantileStreamResourceFlush",
    "BoostedTreesQuantileStreamResourceGetBucketBoundaries",
    "BoostedTreesQuantileStreamResourceHandleOp", "BoostedTreesSerializeEnsemble",
    "BoostedTreesSparseAggregateStats", "BoostedTreesSparseCalculateBestFeatureSplit",
    "BoostedTreesTrainingPredict", "BoostedTreesUpdateEnsemble",
    "BoostedTreesUpdateEnsembleV2", "CSRSparseMatrixComponents", "CSRSparseMatrixToDense",
    "CSRSparseMatrixToSparseTensor", "CTCBeamSearchDecoder", "CTCGreedyDecoder", "CTCLoss",
    "CTCLossV2", "CheckPinned", "CholeskyGrad", "CombinedNonMaxSuppression", "ComplexStruct",
    "CompositeTensorVariantFromComponents", "CompositeTensorVariantToComponents",
    "ComputeAccidentalHits", "ComputeBatchSize", "ConstructionFails", "Conv3DBackpropFilter",
    "Conv3DBackpropInput", "ConvertToCooTensor", "CountUpTo", "CropAndResize",
    "CropAndResizeGradBoxes", "CropAndResizeGradImage", "CudnnRNN", "CudnnRNNBackprop",
    "CudnnRNNBackpropV2", "CudnnRNNBackpropV3", "CudnnRNNCanonicalToParams",
    "CudnnRNNCanonicalToParamsV2", "CudnnRNNParamsSize", "CudnnRNNParamsToCanonical",
    "CudnnRNNParamsToCanonicalV2", "CudnnRNNV2", "CudnnRNNV3", "Dawsn", "DecodeAndCropJpeg",
    "DecodeBase64", "DecodeBmp", "DecodeCSV", "DecodeCompressed", "DecodeGif", "DecodeImage",
    "DecodeJSONExample", "DecodeJpeg", "DecodeJxl", "DecodePaddedRaw", "DecodePng",
    "DecodeProtoV2", "DecodeRaw", "DecodeWav", "DecodeWebP", "DeepCopy", "DefaultAttrs",
    "DeleteMemoryCache", "DeleteRandomSeedGenerator", "DeleteSeedGenerator", "DenseBincount",
    "DenseCountSparseOutput", "DenseToCSRSparseMatrix", "DenseToDenseSetOperation",
    "DenseToSparseSetOperation", "Dequantize", "DeserializeManySparse", "DeserializeSparse",
    "DestroyTemporaryVariable", "DeviceIndex", "DevicePlacementOp", "Dilation2D",
    "Dilation2DBackpropFilter", "Dilation2DBackpropInput", "DistributedSave",
    "DrawBoundingBoxes", "DrawBoundingBoxesV2", "DtypeWithDefaultOp", "EditDistance", "Eig",
    "Empty", "EmptyTensorMap", "EncodeBase64", "EncodeJpeg", "EncodeJpegVariableQuality",
    "EncodePng", "EncodeProto", "EncodeWav", "Expint", "ExtractGlimpse", "ExtractGlimpseV2",
    "ExtractJpegShape", "ExtractVolumePatches", "FFT", "FFT2D", "FFT3D", "FFTND", "Fact",
    "FakeParam", "FakeQuantWithMinMaxArgs", "FakeQuantWithMinMaxArgsGradient",
    "FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsGradient",
    "FakeQuantWithMinMaxVarsPerChannel", "FakeQuantWithMinMaxVarsPerChannelGradient",
    "FinepruneBuiltWithCuda", "Fingerprint", "FiveFloatOutputs", "FloatInput", "FloatOutput",
    "FloatOutputStringOutput", "Foo1", "Foo2", "Foo3", "FractionalAvgPool",
    "FractionalAvgPoolGrad", "FractionalMaxPool", "FractionalMaxPoolGrad", "FresnelCos",
    "FresnelSin", "FusedPadConv2D", "FusedResizeAndPadConv2D", "GRUBlockCell",
    "GRUBlockCellGrad", "GenerateBoundingBoxProposals", "GetElementAtIndex", "GetOptions",
    "GlobalIterId", "GraphDefVersion", "GuaranteeConst", "HSVToRGB", "HistogramFixedWidth",
    "HostConst", "IFFT", "IFFT2D", "IFFT3D", "IFFTND", "IRFFT", "IRFFT2D", "IRFFT3D",
    "IRFFTND", "Igamma", "IgammaGradA", "Igammac", "ImageProjectiveTransformV2",
    "ImageProjectiveTransformV3", "InPolymorphicTwice", "InTopK", "InplaceAdd", "InplaceSub",
    "InplaceUpdate", "Int64Output", "IntAttr", "IntInput", "IntInputFloatInput",
    "IntInputIntOutput", "IntOutput", "IntOutputFloatOutput",
    "IsBoostedTreesEnsembleInitialized", "IsBoostedTreesQuantileStreamResourceInitialized",
    "IsResourceHandleRefCounting", "IsTensorFloat32Enabled", "IsotonicRegression",
    "KMC2ChainInitialization", "KmeansPlusPlusInitialization", "KthOrderStatistic",
    "LSTMBlockCell", "LSTMBlockCellGrad", "ListInput", "ListOutput", "Lu", "MakeUnique",
    "MakeWeakResourceHandle", "MatrixDiag", "MatrixDiagPart", "MatrixDiagPartV2",
    "MatrixDiagV2", "MatrixExponential", "MatrixLogarithm", "MatrixSetDiag", "MatrixSetDiagV2",
    "MatrixSolveLs", "MatrixSquareRoot", "MaxPool3DGradGrad", "MaxPoolGradGradWithArgmax",
    "MaxPoolGradWithArgmax", "MaxPoolWithArgmax", "Mfcc", "MixedStruct", "MlirPassthroughOp",
    "NInPolymorphicTwice", "NInTwice", "NInTwoTypeVariables", "NIntsIn", "NIntsOut",
    "NIntsOutDefault", "NPolymorphicIn", "NPolymorphicOut", "NPolymorphicOutDefault",
    "NPolymorphicRestrictIn", "NPolymorphicRestrictOut", "Namespace>TestStringOutput",
    "NearestNeighbors", "NextAfter", "NonDeterministicInts", "NonMaxSuppression",
    "NonMaxSuppressionV2", "NonMaxSuppressionV3", "NonMaxSuppressionV4", "NonMaxSuppressionV5",
    "NonMaxSuppressionWithOverlaps", "None", "NthElement", "Old", "OpWithDefaultAttr",
    "OpWithFutureDefaultAttr", "OutT", "OutTypeList", "OutTypeListRestrict", "ParallelConcat",
    "ParameterizedTruncatedNormal", "ParseExample", "ParseExampleV2", "ParseSequenceExample",
    "ParseSequenceExampleV2", "ParseSingleExample", "ParseSingleSequenceExample",
    "ParseTensor", "Polygamma", "Polymorphic", "PolymorphicDefaultOut", "PolymorphicOut",
    "PopulationCount", "Prelinearize", "PrelinearizeTuple", "QuantizeAndDequantize",
    "QuantizeAndDequantizeV2", "QuantizeAndDequantizeV3", "QuantizeAndDequantizeV4",
    "QuantizeAndDequantizeV4Grad", "QuantizeDownAndShrinkRange", "QuantizeV2", "QuantizedAdd",
    "QuantizedAvgPool", "QuantizedBatchNormWithGlobalNormalization", "QuantizedBiasAdd",
    "QuantizedConcat", "QuantizedConcatV2", "QuantizedConv2D", "QuantizedConv2DAndRelu",
    "QuantizedConv2DAndReluAndRequantize", "QuantizedConv2DAndRequantize",
    "QuantizedConv2DPerChannel", "QuantizedConv2DWithBias", "QuantizedConv2DWithBiasAndRelu",
    "QuantizedConv2DWithBiasAndReluAndRequantize", "QuantizedConv2DWithBiasAndRequantize",
    "QuantizedConv2DWithBiasSignedSumAndReluAndRequantize",
    "QuantizedConv2DWithBiasSumAndRelu", "QuantizedConv2DWithBiasSumAndReluAndRequantize",
    "QuantizedDepthwiseConv2D", "QuantizedDepthwiseConv2DWithBias",
    "QuantizedDepthwiseConv2DWithBiasAndRelu",
    "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize", "QuantizedInstanceNorm",
    "QuantizedMatMul", "QuantizedMatMulWithBias", "QuantizedMatMulWithBiasAndDequantize",
    "QuantizedMatMulWithBiasAndRelu", "QuantizedMatMulWithBiasAndReluAndRequantize",
    "QuantizedMatMulWithBiasAndRequantize", "QuantizedMaxPool", "QuantizedMul",
    "QuantizedRelu", "QuantizedRelu6", "QuantizedReluX", "QuantizedReshape",
    "QuantizedResizeBilinear", "RFFT", "RFFT2D", "RFFT3D", "RFFTND", "RGBToHSV",
    "RaggedBincount", "RaggedCountSparseOutput", "RaggedCross", "RaggedFillEmptyRows",
    "RaggedFillEmptyRowsGrad", "RaggedGather", "RaggedRange", "RaggedTensorFromVariant",
    "RaggedTensorToSparse", "RaggedTensorToTensor", "RaggedTensorToVariant",
    "RaggedTensorToVariantGradient", "RandomCrop", "RandomGammaGrad", "RandomIndexShuffle",
    "RandomPoisson", "ReadVariableXlaSplitND", "ReduceJoin", "RefEnter", "RefExit",
    "RefIdentity", "RefIn", "RefInputFloatInput", "RefInputFloatInputIntOutput",
    "RefInputIntInput", "RefMerge", "RefNextIteration", "RefOut", "RefOutput",
    "RefOutputFloatOutput", "RefSelect", "RefSwitch", "RegexFullMatch", "RegexReplace",
    "RequantizationRange", "RequantizationRangePerChannel", "Requantize",
    "RequantizePerChannel", "RequiresOlderGraphVersion", "ReservedAttr", "ReservedInput",
    "ResourceApplyAdagrad", "ResourceApplyAdagradDA", "ResourceApplyAddSign",
    "ResourceApplyCenteredRMSProp", "ResourceApplyFtrl", "ResourceApplyFtrlV2",
    "ResourceApplyPowerSign", "ResourceApplyProximalAdagrad",
    "ResourceApplyProximalGradientDescent", "ResourceCountUpTo", "ResourceCreateOp",
    "ResourceInitializedOp", "ResourceSparseApplyAdadelta", "ResourceSparseApplyAdagrad",
    "ResourceSparseApplyAdagradDA", "ResourceSparseApplyAdagradV2",
    "ResourceSparseApplyCenteredRMSProp", "ResourceSparseApplyFtrl",
    "ResourceSparseApplyFtrlV2", "ResourceSparseApplyKerasMomentum",
    "ResourceSparseApplyMomentum", "ResourceSparseApplyProximalAdagrad",
    "ResourceSparseApplyProximalGradientDescent", "ResourceSparseApplyRMSProp",
    "ResourceUsingOp", "Restrict", "Reverse", "SampleDistortedBoundingBox",
    "SampleDistortedBoundingBoxV2", "ScaleAndTranslate", "ScaleAndTranslateGrad", "ScatterAdd",
    "ScatterDiv", "ScatterMax", "ScatterMin", "ScatterMul", "ScatterNdAdd", "ScatterNdMax",
    "ScatterNdMin", "ScatterNdNonAliasingAdd", "ScatterNdSub", "ScatterNdUpdate", "ScatterSub",
    "ScatterUpdate", "SdcaFprint", "SdcaOptimizer", "SdcaOptimizerV2", "SdcaShrinkL1",
    "SegmentMax", "SegmentMaxV2", "SegmentMean", "SegmentMin", "SegmentMinV2", "SegmentProd",
    "SegmentProdV2", "SegmentSumV2", "SelfAdjointEig", "SerializeManySparse",
    "SerializeSparse", "SerializeTensor", "SetSize", "Simple", "SimpleStruct", "SobolSample",
    "SpaceToBatch", "SparseAdd", "SparseAddGrad", "SparseApplyAdadelta", "SparseApplyAdagrad",
    "SparseApplyAdagradDA", "SparseApplyAdagradV2", "SparseApplyCenteredRMSProp",
    "SparseApplyFtrl", "SparseApplyFtrlV2", "SparseApplyMomentum",
    "SparseApplyProximalAdagrad", "SparseApplyProximalGradientDescent", "SparseApplyRMSProp",
    "SparseBincount", "SparseConcat", "SparseCountSparseOutput", "SparseCross",
    "SparseCrossHashed", "SparseCrossV2", "SparseDenseCwiseAdd", "SparseDenseCwiseDiv",
    "SparseDenseCwiseMul", "SparseFillEmptyRows", "SparseFillEmptyRowsGrad", "SparseMatMul",
    "SparseMatrixAdd", "SparseMatrixMatMul", "SparseMatrixMul", "SparseMatrixNNZ",
    "SparseMatrixOrderingAMD", "SparseMatrixSoftmax", "SparseMatrixSoftmaxGrad",
    "SparseMatrixSparseCholesky", "SparseMatrixSparseMatMul", "SparseMatrixTranspose",
    "SparseMatrixZeros", "SparseReduceMax", "SparseReduceMaxSparse", "SparseReduceSum",
    "SparseReduceSumSparse", "SparseReorder", "SparseReshape", "SparseSegmentMean",
    "SparseSegmentMeanGrad", "SparseSegmentMeanGradV2", "SparseSegmentMeanWithNumSegments",
    "SparseSegmentSqrtN", "SparseSegmentSqrtNGrad", "SparseSegmentSqrtNGradV2",
    "SparseSegmentSqrtNWithNumSegments", "SparseSegmentSum", "SparseSegmentSumGrad",
    "SparseSegmentSumGradV2", "SparseSegmentSumWithNumSegments", "SparseSlice",
    "SparseSliceGrad", "SparseSoftmax", "SparseSparseMaximum", "SparseSparseMinimum",
    "SparseSplit", "SparseTensorDenseAdd", "SparseTensorDenseMatMul",
    "SparseTensorToCSRSparseMatrix", "SparseToDense", "SparseToSparseSetOperation", "Spence",
    "StatefulRandomBinomial", "StatefulStandardNormal",
    "StatelessParameterizedTruncatedNormal", "StatelessRandomGammaV2",
    "StatelessRandomPoisson", "StatelessRandomUniformFullInt",
    "StatelessSampleDistortedBoundingBox", "StaticRegexReplace", "StochasticCastToInt",
    "StridedSliceAssign", "StringLength", "StringListAttr", "StringLower", "StringNGrams",
    "StringSplit", "StringSplitV2", "StringStrip", "StringToHashBucket",
    "StringToHashBucketFast", "StringToHashBucketStrong", "StringToNumber", "StringUpper",
    "StubResourceHandleOp", "Substr", "TakeManySparseFromTensorsMap", "TemporaryVariable",
    "TensorArray", "TensorArrayClose", "TensorArrayCloseV2", "TensorArrayConcat",
    "TensorArrayConcatV2", "TensorArrayGather", "TensorArrayGatherV2", "TensorArrayGrad",
    "TensorArrayGradV2", "TensorArrayGradWithShape", "TensorArrayPack", "TensorArrayRead",
    "TensorArrayReadV2", "TensorArrayScatter", "TensorArrayScatterV2", "TensorArraySize",
    "TensorArraySizeV2", "TensorArraySplit", "TensorArraySplitV2", "TensorArrayUnpack",
    "TensorArrayV2", "TensorArrayWrite", "TensorArrayWriteV2", "TensorListConcat",
    "TensorListConcatLists", "TensorListPushBackBatch", "TensorListScatter",
    "TensorListScatterV2", "TensorListSplit", "TensorMapErase", "TensorMapHasKey",
    "TensorMapInsert", "TensorMapLookup", "TensorMapSize", "TensorMapStackKeys", "TestAttr",
    "TestStringOutput", "ToBool", "TopK", "TopKUnique", "TopKWithUnique", "TridiagonalMatMul",
    "TridiagonalSolve", "TwoFloatInputs", "TwoFloatInputsFloatOutput",
    "TwoFloatInputsIntOutput", "TwoFloatOutputs", "TwoIntInputs", "TwoIntOutputs", "TwoRefsIn",
    "TypeList", "TypeListRestrict", "TypeListTwice", "Unary", "UnicodeDecode",
    "UnicodeDecodeWithOffsets", "UnicodeEncode", "UnicodeScript", "UnicodeTranscode",
    "UniformDequantize", "UniformQuantize", "UniformQuantizedAdd",
    "UniformQuantizedClipByValue", "UniformQuantizedConvolution",
    "UniformQuantizedConvolutionHybrid", "UniformQuantizedDot", "UniformQuantizedDotHybrid",
    "UniformRequantize", "UniqueWithCountsV2", "UnsortedSegmentJoin",
    "UpdateTaskIdAndGlobalCoreArray", "WindowOp", "Zeta"
})

# fmt: on


def refusal_reason(op: str) -> str | None:
    """Why ``op`` is refused, or None when it is in ``ALLOWED_OPS``."""
    if op in ALLOWED_OPS:
        return None
    for pattern, reason in _REFUSED_FAMILIES:
        if pattern.search(op):
            return reason
    if op in NOT_NEEDED:
        return "not needed by a model's forward/backward pass or the variable restore"
    return "not in the reviewed op allowlist"


def explicitly_refused(op: str) -> bool:
    """True when ``op`` is refused by a reviewed family or the ``NOT_NEEDED`` list (the
    allowlist test requires every registered op to be allowed or explicitly refused)."""
    return op not in ALLOWED_OPS and (
        op in NOT_NEEDED or any(p.search(op) for p, _ in _REFUSED_FAMILIES)
    )
