using System.CommandLine;
using Mamo.Data.Datasets;
using Mamo.Model;
using Mamo.Model.Published;

namespace Mamo.Cli.Commands;

/// <summary>`mamo import`: published weights (HF BERT, its ONNX export, timm ViT) into a checkpoint that `pretrain
/// --init` and `finetune --from` start from (docs/IMPORT.md).</summary>
public static class ImportCommand
{
    public static Command Create()
    {
        var text = new Option<string?>("--text")
        {
            Description = "Text encoder weights: hf-bert:PATH (model.safetensors or its folder), onnx:PATH, or minilm (all-MiniLM-L6-v2, fetched as `mamo datasets fetch minilm`)",
        };
        var image = new Option<string?>("--image") { Description = "Image encoder weights: timm-vit:PATH (model.safetensors or its folder)" };
        var preset = new Option<string>("--preset") { Description = $"The architecture: {string.Join(", ", MamoConfig.PresetNames)}", Required = true };
        preset.AcceptOnlyFromAmong([.. MamoConfig.PresetNames]);
        var output = new Option<string>("--out") { Description = "The checkpoint folder to write (new or empty)", Required = true };
        var seed = new Option<int>("--seed") { Description = "Seed of the parameters not imported", DefaultValueFactory = _ => 1 };
        var command = new Command("import", "Write a checkpoint whose encoders start from published weights") { text, image, preset, output, seed };
        command.SetAction(parse =>
        {
            var error = parse.InvocationConfiguration.Error;
            try
            {
                var textSource = parse.GetValue(text) switch
                {
                    null => null,
                    BuiltinDatasets.MiniLm => new WeightSource(WeightSource.Onnx, BuiltinDatasets.Ensure(BuiltinDatasets.MiniLm, log: error.WriteLine).File(BuiltinDatasets.ModelFile)),
                    var t => WeightSource.Parse(t, WeightSource.HfBert, WeightSource.Onnx),
                };
                var imageSource = parse.GetValue(image) is { } i ? WeightSource.Parse(i, WeightSource.TimmVit) : null;
                var config = MamoConfig.Preset(parse.GetValue(preset)!);
                var report = WeightImport.Run(textSource, imageSource, config, parse.GetValue(output)!, parse.GetValue(seed));
                foreach (var line in report) parse.InvocationConfiguration.Output.WriteLine(line);
                parse.InvocationConfiguration.Output.WriteLine($"wrote {Path.GetFullPath(parse.GetValue(output)!)}");
                return 0;
            }
            catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or UnauthorizedAccessException or DatasetFetchException or NpmMissingException)
            {
                error.WriteLine($"mamo import: {e.Message}");
                return ExitCodes.Failed;
            }
        });
        return command;
    }
}
