using System.CommandLine;
using Mamo.Model;
using Mamo.Model.Published;

namespace Mamo.Cli.Commands;

/// <summary>`mamo export --format hf-bert|timm-vit CHECKPOINT OUT` (docs/IMPORT.md).</summary>
public static class ExportCommand
{
    public static Command Create()
    {
        var format = new Option<string>("--format") { Description = "hf-bert (text encoder and fusion layers) or timm-vit (image encoder)", Required = true };
        format.AcceptOnlyFromAmong(WeightSource.HfBert, WeightSource.TimmVit);
        var weights = new Option<string>("--weights") { Description = "teacher (the EMA weights evaluation uses, the default where saved) or student" };
        weights.AcceptOnlyFromAmong(Checkpoint.TeacherPart, Checkpoint.StudentPart);
        var checkpoint = new Argument<string>("checkpoint") { Description = "A checkpoint folder, or a run folder (its newest checkpoint)" };
        var output = new Argument<string>("out") { Description = "The folder to write model.safetensors and config.json into" };
        var command = new Command("export", "Write a checkpoint's encoder in a published layout (Hugging Face BERT, timm ViT)") { format, weights, checkpoint, output };
        command.SetAction(parse =>
        {
            var error = parse.InvocationConfiguration.Error;
            var dir = Checkpoint.Latest(parse.GetValue(checkpoint)!);
            if (dir is null)
            {
                error.WriteLine($"mamo export: no checkpoint at {parse.GetValue(checkpoint)}");
                return ExitCodes.Usage;
            }
            try
            {
                var parts = Checkpoint.Parts(Checkpoint.ReadState(dir));
                var part = parse.GetValue(weights) ?? Checkpoint.InferencePart(dir);
                if (!parts.Contains(part)) throw new InvalidDataException($"{dir} holds no {part} weights");
                parse.InvocationConfiguration.Output.WriteLine(WeightExport.Run(dir, Checkpoint.PartFile(part), parse.GetValue(format)!, parse.GetValue(output)!));
                return 0;
            }
            catch (Exception e) when (e is ArgumentException or IOException or InvalidDataException or UnauthorizedAccessException or System.Text.Json.JsonException)
            {
                error.WriteLine($"mamo export: {e.Message}");
                return ExitCodes.Failed;
            }
        });
        return command;
    }
}
